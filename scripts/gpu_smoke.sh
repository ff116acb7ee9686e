#!/usr/bin/env bash
# GPU smoke test, one command: the paper preset for a few steps on one GPU under DDP and under DeepSpeed, in
# bf16 and fp16, then one line per case with the training throughput (perf/bytes_per_s of the last logged
# interval) and the peak GPU memory (perf/memory_bytes) from the run's metrics.jsonl.
#
#   scripts/gpu_smoke.sh                          # prepares the demo corpus if DATA is not given
#   DATA=data/enwik8 STEPS=100 scripts/gpu_smoke.sh
#   DRY_RUN=1 scripts/gpu_smoke.sh                # print the commands (works without a GPU)
#
# The GPU acceptance command, `python -m bench.gpu` (bench/gpu.py), runs this script as one of its checks
# (STEPS=10 GPU_TESTS=0; it runs `pytest -m gpu` itself): run that one for a full acceptance and its record.
# Cases: ddp-bf16 and ddp-fp16 (launch/ddp.yaml, one process: DDP at world size 1, LAMB, autocast);
# ds-fp16 (launch/deepspeed.yaml, ZeRO-0, LAMB, DeepSpeed's fp16 with loss scaling); ds-bf16 (the same with
# --optimizer adamw: the trainer refuses LAMB under DeepSpeed bf16, whose optimizer wrapper hands LAMB flat
# partitions instead of the model's tensors). bf16 cases are skipped on GPUs without bf16.
# Then the tests marked `gpu` (`pytest -m gpu tests/`: tests/test_gpu_paths.py and any other test that needs a
# real device; they skip themselves without one), one more line in the summary.
# Environment: DATA, STEPS [30], WORK [runs/gpu_smoke: one run directory per case, replaced], PYTHON [python],
# ACCELERATE [accelerate], PORT [29650], GPU_TESTS [1; 0 leaves the pytest run out]. Select the GPU with
# CUDA_VISIBLE_DEVICES. Exit status 0 when every case that ran trained and wrote its metrics, and the gpu
# tests passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
ACCELERATE=${ACCELERATE:-accelerate}
STEPS=${STEPS:-30}
WORK=${WORK:-runs/gpu_smoke}
DATA=${DATA:-$WORK/data}
PORT=${PORT:-29650}
DRY_RUN=${DRY_RUN:-0}
GPU_TESTS=${GPU_TESTS:-1}
gpu_tests=("$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/)

cases=(
    "ddp-bf16 launch/ddp.yaml --precision bf16"
    "ddp-fp16 launch/ddp.yaml --precision fp16"
    "ds-fp16 launch/deepspeed.yaml --precision fp16"
    "ds-bf16 launch/deepspeed.yaml --precision bf16 --optimizer adamw"
)
common=(--preset paper --data "$DATA" --max_steps "$STEPS" --warmup_steps 5 --log_every 5 --eval_every 0
        --save_every 0 --no_test_at_end --sample_bytes 0 --eval_max_segments 2)

command_for() {  # name config train-args... -> the accelerate launch command, in the array `cmd`
    local name=$1 config=$2
    shift 2
    cmd=("$ACCELERATE" launch --config_file "$config" --num_processes 1 --main_process_port "$PORT"
         -m train "${common[@]}" --out "$WORK/$name" "$@")
}

if [[ $DRY_RUN == 1 ]]; then
    for spec in "${cases[@]}"; do
        read -r -a words <<<"$spec"
        command_for "${words[@]}"
        printf '%q ' "${cmd[@]}" | sed 's/ $//'
        echo
    done
    if [[ $GPU_TESTS == 1 ]]; then  # on stderr: stdout holds one training command per line
        echo "then: $(printf '%q ' "${gpu_tests[@]}" | sed 's/ $//')" >&2
    fi
    exit 0
fi

# Fail before preparing anything when there is no GPU.
if ! gpu=$("$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA GPU")
print(torch.cuda.get_device_name(0), int(torch.cuda.is_bf16_supported()))
' 2>&1); then
    echo "gpu_smoke.sh: error: this smoke test needs a CUDA GPU: ${gpu##*$'\n'}. Nothing was run." >&2
    exit 1
fi
has_bf16=${gpu##* }
echo "gpu_smoke.sh: ${gpu% *}, $STEPS steps of the paper preset per case, runs under $WORK/"

mkdir -p "$WORK"
if [[ ! -f $DATA/manifest.json ]]; then
    echo "gpu_smoke.sh: no corpus at $DATA: preparing the demo corpus"
    "$PYTHON" -m sharnn.corpus.prepare demo --out "$DATA"
fi

report() {  # run directory -> "bytes/s  memory  loss" from metrics.jsonl
    "$PYTHON" - "$1/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rate = [r["perf/bytes_per_s"] for r in rows if "perf/bytes_per_s" in r]
mem = [r["perf/memory_bytes"] for r in rows if "perf/memory_bytes" in r]
loss = [r["train/loss"] for r in rows if "train/loss" in r]
if not rate:
    sys.exit("no perf/bytes_per_s in metrics.jsonl")
print(f"{rate[-1]:>12,.0f} B/s  {max(mem) / 2**30:>6.2f} GiB  loss {loss[-1]:.3f}")
EOF
}

failed=0
summary=()
for spec in "${cases[@]}"; do
    read -r -a words <<<"$spec"
    name=${words[0]}
    if [[ $name == *bf16 && $has_bf16 != 1 ]]; then
        summary+=("$(printf '%-9s skipped: this GPU has no bf16' "$name")")
        continue
    fi
    command_for "${words[@]}"
    rm -rf "${WORK:?}/$name"
    echo "gpu_smoke.sh: $name: $(printf '%q ' "${cmd[@]}")"
    if "${cmd[@]}" >"$WORK/$name.log" 2>&1 && line=$(report "$WORK/$name" 2>&1); then
        summary+=("$(printf '%-9s %s' "$name" "$line")")
    else
        failed=1
        summary+=("$(printf '%-9s FAILED: see %s' "$name" "$WORK/$name.log")")
        tail -n 25 "$WORK/$name.log" >&2
    fi
done
if [[ $GPU_TESTS == 1 ]]; then
    echo "gpu_smoke.sh: the tests marked gpu: ${gpu_tests[*]}"
    if "${gpu_tests[@]}" >"$WORK/gpu_tests.log" 2>&1; then
        summary+=("$(printf '%-9s %s' pytest "$(tail -n 1 "$WORK/gpu_tests.log")")")
    else
        failed=1
        summary+=("$(printf '%-9s FAILED: see %s' pytest "$WORK/gpu_tests.log")")
        tail -n 40 "$WORK/gpu_tests.log" >&2
    fi
fi
echo
echo "case      bytes per second   peak memory"
printf '%s\n' "${summary[@]}"
exit "$failed"
