# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/demo

.PHONY: demo test lint setup clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, exactly pinned: here it is a local CPU wheel; elsewhere the same pin is the CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	touch $@

setup: $(BIN)/.installed

# Train the tiny SHA-RNN on the Python standard library's own source (no download), a few minutes on CPU.
demo: setup
	$(BIN)/sharnn-prepare demo --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(BIN)/sharnn-train --preset tiny --data $(DEMO_DATA) --out $(DEMO_RUN)
	@echo; echo "--- a sample from the best checkpoint of $(DEMO_RUN):"
	$(BIN)/sharnn-generate $(DEMO_RUN) --prompt 'def ' --length 300 --temperature 0.7 --seed 0 --echo
	@echo; echo "--- TensorBoard: $(BIN)/tensorboard --logdir $(DEMO_RUN)/tensorboard"

# The linter first (ruff, configured in pyproject.toml), then the tests.
test: lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data runs
