"""The Hugging Face Hub (sharnn/hub.py), without the network: `SHARNN.from_pretrained` loads what `load_model`
loads; repo ids from the Hub's cache (laid out as the Hub does, HF_HUB_OFFLINE) in load_model, sharnn-eval,
sharnn-generate and --init_from; a missing repo is one `error:` line; the model card; `sharnn-export
--push_to_hub` and `model.push_to_hub` against a stand-in of the Hub's HTTP API (create repo, preupload,
commit), asserting the files that arrive byte for byte."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from safetensors import safe_open

from sharnn import SHARNN, ModelConfig
from sharnn.pretrained import ModelError, find_model, load_model, save_model
from tests.helpers import REPO, exits_with, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(d_model=32, d_ff=64, n_layer=2, mem_len=16)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def logits(model: SHARNN) -> torch.Tensor:
    x = torch.randint(0, 256, (12, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny model written by save_model: the exported format as it was before the Hub mixin."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hub") / "tiny"
    save_model(SHARNN(TINY), out)
    return out


def cache_repo(cache: Path, repo_id: str, files: Path, commit: str = COMMIT) -> None:
    """Put `files` into a Hub cache as a snapshot of `repo_id` at `commit` (refs/main points at it), as
    snapshot_download leaves it (it links blobs; plain copies read the same)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, tiny_model) -> Path:
    """An offline Hub (HF_HUB_OFFLINE) whose cache holds alice/tiny (the tiny model) and nothing else."""
    cache = tmp_path / "hub-cache"
    cache_repo(cache, "alice/tiny", tiny_model)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that no local alice/tiny directory could shadow the repo id
    return cache


# ------------------------------------------------------------------------------------- loading
def test_from_pretrained_is_load_model_and_save_pretrained_keeps_the_format(tiny_model, tmp_path):
    want = logits(load_model(tiny_model))
    model = SHARNN.from_pretrained(str(tiny_model))
    assert not model.training and torch.equal(logits(model), want)
    assert torch.equal(logits(SHARNN.from_pretrained(tiny_model / "model.safetensors")), want)

    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["README.md", "config.json",
                                                                      "model.safetensors"]
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == TINY.to_dict()  # flat, as before
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "sharnn-model"
    assert torch.equal(logits(load_model(tmp_path / "saved")), want)
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.library_name == "sharnn" and "33,408" in card.text  # TINY's parameter count
    assert SHARNN(TINY).num_params() == 33_408


def test_repo_ids_load_from_the_hub_cache_offline(offline_cache):
    want = logits(load_model(offline_cache / "models--alice--tiny" / "snapshots" / COMMIT))
    source = find_model("alice/tiny")
    assert source.kind == "exported" and source.repo_id == "alice/tiny"
    assert "alice/tiny on the Hub" in source.describe()
    assert torch.equal(logits(load_model("alice/tiny")), want)
    assert torch.equal(logits(load_model(f"alice/tiny@{COMMIT}")), want)
    assert torch.equal(logits(SHARNN.from_pretrained("alice/tiny")), want)


def test_a_missing_repo_offline_is_a_clear_error(offline_cache, tmp_path, capsysbinary):
    from sharnn.generate import main as generate
    from train.evaluate import main as evaluate

    with pytest.raises(ModelError, match="bob/missing is neither a local path nor a model reachable on the "
                                         "Hugging Face Hub: HF_HUB_OFFLINE is set"):
        load_model("bob/missing")
    with pytest.raises(ModelError, match="alice/tiny@v2 .*HF_HUB_OFFLINE"):
        SHARNN.from_pretrained("alice/tiny@v2")
    with pytest.raises(ModelError, match="does not exist"):  # a path that cannot be a repo id stays a path
        load_model("./alice/tiny")
    exits_with(generate, ["bob/missing", "--length", "5"], "bob/missing is neither a local path", "HF_HUB")
    out = tmp_path / "eval.json"
    exits_with(evaluate, ["bob/missing", "--data", str(tmp_path), "--json", str(out)], "bob/missing")
    assert not out.exists() and capsysbinary.readouterr().out == b""
    assert sorted(p.name for p in offline_cache.iterdir()) == ["models--alice--tiny"]  # nothing half-written


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    from sharnn.prepare import prepare_files

    src = tmp_path_factory.mktemp("src") / "text.txt"
    src.write_bytes((REPO / "README.md").read_bytes()[:30_000])
    out = tmp_path_factory.mktemp("corpus") / "small"
    prepare_files([src], out, valid_bytes=4_000, test_bytes=4_000)
    return out


def test_eval_and_generate_take_a_repo_id(offline_cache, small_corpus, tmp_path, capsysbinary):
    from sharnn.generate import main as generate
    from train.evaluate import main as evaluate

    local = offline_cache / "models--alice--tiny" / "snapshots" / COMMIT
    generated = []
    for model in ("alice/tiny", str(local)):
        assert generate([model, "--prompt", "The ", "--temperature", "0", "--length", "20"]) == 0
        generated.append(capsysbinary.readouterr().out)
    assert generated[0] == generated[1] and len(generated[0]) == 20
    results = []
    for model in ("alice/tiny", str(local)):
        out = tmp_path / f"{len(results)}.json"
        assert evaluate([model, "--data", str(small_corpus), "--streams", "2", "--bptt", "16",
                         "--max_segments", "3", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["bpc"] == results[1]["bpc"] and results[0]["model_kind"] == "exported"


def test_init_from_takes_a_repo_id(offline_cache, tiny_model):
    import dataclasses

    from train.build import build_model
    from train.config import preset

    cfg = dataclasses.replace(preset("tiny"), model=TINY, init_from="alice/tiny")
    model, said = build_model(cfg, train_split=None, fresh=True)
    assert said.startswith(f"initialised weights from {offline_cache}")
    assert torch.equal(logits(model.eval()), logits(load_model(tiny_model)))
    with pytest.raises(SystemExit, match="error: --init_from: bob/missing is neither a local path"):
        build_model(dataclasses.replace(cfg, init_from="bob/missing"), train_split=None, fresh=True)


# ---------------------------------------------------------------------------------------- model card
def fake_run(root: Path, state_dict: dict, config: ModelConfig, test_bpc: float | None) -> Path:
    """A run directory in train/checkpoint.py's layout with one complete checkpoint (step 7, the best), its
    corpus manifest and summary.json, without training."""
    from safetensors.torch import save_file

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "manifest.json").write_text(json.dumps({
        "format": "sharnn-corpus", "source": {"kind": "files", "n_files": 1},
        "splits": {"train": {"n_bytes": 9000, "sha256": "ab" * 32}, "valid": {"n_bytes": 500},
                   "test": {"n_bytes": 500}}}))
    ckpt = root / "run" / "checkpoints" / "step-00000007"
    ckpt.mkdir(parents=True)
    save_file(state_dict, ckpt / "model.safetensors")
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": config.to_dict(), "data": str(corpus)}))
    (ckpt / "train_state.json").write_text(json.dumps({"step": 7}))
    (root / "run" / "checkpoints" / "best.json").write_text(json.dumps({"step": 7, "dir": ckpt.name,
                                                                          "val_bpc": 4.5}))
    (root / "run" / "summary.json").write_text(json.dumps({"step": 7, "best_val_bpc": 4.5,
                                                           "test_bpc": test_bpc}))
    return root / "run"


def test_export_writes_a_model_card(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from train.export import main as export

    run_dir = fake_run(tmp_path, load_file(tiny_model / "model.safetensors"), TINY, test_bpc=4.25)
    assert export([str(run_dir), "--out", str(tmp_path / "out"), "--license", "mit"]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert (card.data.library_name, card.data.license) == ("sharnn", "mit")
    assert "sharnn" in card.data.tags
    for line in ("| `d_model` | 32 |", "Parameters: 33,408", "- Steps: 7", "- Test bpc: 4.2500",
                 "`files` (n_files: 1), prepared by sharnn-prepare: train 9,000 bytes", "ab" * 32,
                 'SHARNN.from_pretrained("' + str(tmp_path / "out") + '")'):
        assert line in card.text, line
    assert torch.equal(logits(SHARNN.from_pretrained(str(tmp_path / "out"))), logits(load_model(tiny_model)))
    assert torch.equal(logits(SHARNN.from_pretrained(str(run_dir))), logits(load_model(tiny_model)))  # a run

    # exporting the export again (here in bf16) keeps what the card knew: it is in the weights' metadata
    assert export([str(tmp_path / "out"), "--out", str(tmp_path / "again"), "--dtype", "bf16"]) == 0
    again = ModelCard.load(tmp_path / "again" / "README.md").text
    assert again.split("## Training")[1] == card.text.split("## Training")[1].replace(
        str(tmp_path / "out"), str(tmp_path / "again"))

    # no test bpc in the run; an exported model from before the card: what is not known is said
    (run_dir / "summary.json").write_text(json.dumps({"step": 7, "test_bpc": None}))
    assert export([str(run_dir), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert "- Test bpc: not measured" in ModelCard.load(tmp_path / "out" / "README.md").text
    assert export([str(tiny_model), "--out", str(tmp_path / "old")]) == 0
    text = ModelCard.load(tmp_path / "old" / "README.md").text
    assert "- Steps: not recorded" in text and "- Corpus: not recorded" in text


@pytest.mark.slow
def test_the_card_of_a_trained_run(trained, tmp_path):
    from train.export import main as export

    summary = json.loads((trained / "summary.json").read_text())
    assert export([str(trained), "--out", str(tmp_path / "out")]) == 0
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert f"- Test bpc: {summary['test_bpc']:.4f}" in text and "- Steps: 10" in text
    assert "prepared by sharnn-prepare: train" in text


# ----------------------------------------------------------------------------------------- uploading
class StandInHub:
    """The Hub's HTTP API as far as HfApi.create_repo and upload_folder use it: POST /api/repos/create,
    /api/validate-yaml (a README.md's metadata), /api/models/{repo}/preupload/{rev} (every file "regular":
    sent inline, no LFS) and /api/models/{repo}/commit/{rev} (NDJSON: a header, then one base64 file per
    line)."""

    def __init__(self):
        self.created: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.tokens: set[str | None] = set()
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.tokens.add(self.headers.get("Authorization"))
                parts = self.path.split("?")[0].strip("/").split("/")  # api, models, owner, name, verb, rev
                if parts == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}"
                    hub.created[repo_id] = request
                    return self.reply({"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if parts == ["api", "validate-yaml"]:
                    hub.validated.append(json.loads(body)["content"])
                    return self.reply({})
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    return self.reply({"files": [{"path": f["path"], "uploadMode": "regular",
                                                  "shouldIgnore": False} for f in json.loads(body)["files"]]})
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files.setdefault(repo_id, {})[item["value"]["path"]] = \
                                base64.b64decode(item["value"]["content"])
                    return self.reply({"commitUrl": f"{hub.url}/{repo_id}/commit/{COMMIT}",
                                       "commitOid": COMMIT})
                self.send_error(404)

            def do_GET(self):
                self.send_error(404)

            def reply(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in_hub(tmp_path, monkeypatch):
    """The stand-in, and this process's huggingface_hub pointed at it (HF_ENDPOINT is read at import, so
    constants.ENDPOINT is set instead), with a token in HF_TOKEN."""
    hub = StandInHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    yield hub
    hub.close()


def tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_export_push_to_hub_in_a_fresh_process_with_hf_endpoint(stand_in_hub, tiny_model, tmp_path):
    from safetensors.torch import load_file

    run_dir = fake_run(tmp_path, load_file(tiny_model / "model.safetensors"), TINY, test_bpc=4.25)
    out = tmp_path / "out"
    env = subprocess_env()
    env.update(HF_ENDPOINT=stand_in_hub.url, HF_TOKEN="hf_standin", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "train.export", str(run_dir), "--out", str(out),
                           "--push-to-hub", "alice/pushed", "--private"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert stand_in_hub.created["alice/pushed"]["visibility"] == "private"
    assert stand_in_hub.tokens == {"Bearer hf_standin"}
    arrived = stand_in_hub.files["alice/pushed"]
    assert arrived == {p.name: p.read_bytes() for p in out.iterdir()}  # every file, byte for byte
    assert sorted(arrived) == ["README.md", "config.json", "model.safetensors"]
    assert 'SHARNN.from_pretrained("alice/pushed")' in arrived["README.md"].decode()
    assert stand_in_hub.validated == [arrived["README.md"].decode()]  # the card's metadata was checked


def test_push_without_out_and_through_the_mixin(stand_in_hub, tiny_model, tmp_path):
    from safetensors.torch import load_file

    from train.export import main as export

    want = load_file(tiny_model / "model.safetensors")
    # sharnn-export --push_to_hub without --out: a temporary export, uploaded, then removed
    assert export([str(tiny_model), "--push_to_hub", "alice/only"]) == 0
    arrived = stand_in_hub.files["alice/only"]
    assert sorted(arrived) == ["README.md", "config.json", "model.safetensors"]
    assert same_tensors(tensors(arrived["model.safetensors"]), want)
    assert "visibility" not in stand_in_hub.created["alice/only"]  # public unless --private

    # the Python API: model.push_to_hub through huggingface_hub's mixin, in sharnn's format
    SHARNN.from_pretrained(str(tiny_model)).push_to_hub("alice/mixin")
    arrived = stand_in_hub.files["alice/mixin"]
    assert sorted(arrived) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(arrived["config.json"]) == TINY.to_dict()
    assert same_tensors(tensors(arrived["model.safetensors"]), want)
    assert ModelCard(arrived["README.md"].decode()).data.library_name == "sharnn"
    assert stand_in_hub.tokens == {"Bearer hf_standin"}


def test_push_failures_are_clear_errors(tiny_model, tmp_path, monkeypatch):
    from train.export import main as export

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    exits_with(export, [str(tiny_model), "--push_to_hub", "not a repo"], "--push_to_hub 'not a repo' is not")
    exits_with(export, [str(tiny_model), "--out", str(tmp_path / "x"), "--private"], "add --push_to_hub")
    exits_with(export, [str(tiny_model)], "give --out DIR")
    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        exits_with(export, [str(tiny_model), "--out", str(tmp_path / "x"), "--push_to_hub", "alice/a"],
                   "--push_to_hub: HF_HUB_OFFLINE is set")
    out = tmp_path / "out"
    exits_with(export, [str(tiny_model), "--out", str(out), "--push_to_hub", "alice/unreachable"],
               "cannot upload to the Hugging Face Hub repo alice/unreachable: the Hub at http://127.0.0.1:9 "
               "cannot be reached",
               f"the export in {out} is complete")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no --out x, no temporary directory


class RefusingHub:
    """The Hub answering every request as it answers a token it does not accept: 401 with its JSON error
    ("Invalid credentials in Authorization header", no X-Error-Code: not a missing repo)."""

    def __init__(self, status: int = 401):
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def refuse(self):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_POST = refuse

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_refused_token_on_download_asks_for_one_that_may_read(tiny_model, tmp_path, monkeypatch):
    """Issue 26: a 401 on a download advised "a token that may write to it"."""
    from train.export import main as export

    hub = RefusingHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as refused:
        load_model("alice/tiny")
    assert "401" in str(refused.value) and "valid token" in str(refused.value), refused.value
    assert "write" not in str(refused.value), refused.value
    exits_with(export, [str(tiny_model), "--out", str(tmp_path / "out"), "--push_to_hub", "alice/tiny"],
               "401", "valid token that may write to it")
    hub.server.shutdown()
    hub.server.server_close()
