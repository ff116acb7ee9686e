"""Sharing models on the Hugging Face Hub: repo ids as model sources, `SHARNN.from_pretrained` /
`push_to_hub` (huggingface_hub's `PyTorchModelHubMixin`), the model card, uploading an exported model.

    from sharnn import SHARNN
    model = SHARNN.from_pretrained("owner/sharnn-enwik8")      # or an exported model directory
    model.push_to_hub("owner/my-sharnn")                        # model.safetensors + config.json + README.md
    sharnn-export runs/paper --out models/paper --push_to_hub owner/sharnn-enwik8

A Hub repo holds an exported model exactly as `sharnn-export` writes it (`sharnn.io.rundir`: model.safetensors
with the format marker in its metadata, config.json with the ModelConfig's fields, README.md the model card),
so a downloaded snapshot is loaded by `sharnn.io.pretrained.load_model` like any exported directory, and
`from_pretrained` is `load_model` on it. A string names a repo only when it is not an existing local path
and reads `owner/name` (optionally `@revision`); `Path` objects are always local. Downloads go through the
Hub's cache (HF_HUB_CACHE) and respect HF_HUB_OFFLINE; the token is the Hub's own (HF_TOKEN or
`hf auth login`). Every failure to reach or read the Hub is a `ModelError` naming the repo and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2  # huggingface_hub 2.x's HTTP client: its connection errors pass through upload calls
from huggingface_hub import ModelCard, ModelCardData, constants, snapshot_download
from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
)

from sharnn.config import ModelConfig
from sharnn.io import rundir
from sharnn.io.rundir import ModelError

if TYPE_CHECKING:
        from sharnn.io.pretrained import ModelSource

LIBRARY_NAME = "sharnn"
CARD_NAME = "README.md"
"""The model card, beside the weights in an exported model and at the root of a Hub repo."""
SUMMARY_NAME = "summary.json"
"""A finished run's summary (train/loop.py): step, best validation bpc and step, test bpc."""
CORPUS_MANIFEST_NAME = "manifest.json"
"""A prepared corpus's manifest (sharnn.corpus.prepare): source, split sizes and sha256."""
REPO_FILES = [rundir.WEIGHTS_NAME, rundir.EXPORT_CONFIG_NAME, CARD_NAME]
"""What is downloaded of a repo: an exported model and its card (not ONNX files nor anything else)."""
PAPER_URL = "https://arxiv.org/abs/1911.11423"
TAGS = ["sharnn", "sha-rnn", "byte-level", "language-modeling", "pytorch"]

# owner/name as the Hub spells them (letters, digits, - _ .), optionally @revision (a branch, tag or commit)
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[\w./-]+))?")


# The license ids the Hub's model cards take (huggingface.co/docs/hub/repositories-licenses; huggingface_hub
# ships no list). A card whose license is none of them shows no license on the Hub.
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c
    ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib
    pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split())


def license_id(text: str) -> str:
    """A model card license as the Hub names it (argparse type of `sharnn-export --license`): 'MIT' and
    'Apache-2.0' are taken as mit and apache-2.0; anything else that is not a Hub license id is refused."""
    value = text.strip().lower()
    if value not in HUB_LICENSES:
        first = value.replace(" ", "-").split("-")[0]
        close = sorted(name for name in HUB_LICENSES if first and name.startswith(first))[:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{text!r} is not a Hub license id{hint}: give one such as mit, apache-2.0 or "
                         "cc-by-4.0 (huggingface.co/docs/hub/repositories-licenses), or 'other'")
    return value


def parse_repo_id(text: str | Path) -> tuple[str, str | None] | None:
    """(repo_id, revision) if `text` names a Hub repo: a str (never a Path) that is no existing local path and
    reads owner/name[@revision]; None otherwise."""
    if not isinstance(text, str) or os.path.exists(text):
        return None
    match = _REPO_ID.fullmatch(text)
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def is_repo_name(text: str) -> bool:
    """Whether `text` is a repo id to create or upload to: owner/name, no revision."""
    match = _REPO_ID.fullmatch(text)
    return match is not None and match["revision"] is None and ".." not in text


# ----------------------------------------------------------------------------------------------- errors
def _reason(e: BaseException, repo_id: str, revision: str | None, writing: bool = False) -> str:
    """What went wrong talking to the Hub, and what to do about it, in one clause (`writing`: an upload)."""
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, GatedRepoError):
        return f"the repo is gated: accept its conditions on the Hub, then {login}"
    if isinstance(e, RepositoryNotFoundError):
        return f"the Hub has no model repo {repo_id} (if it is private, {login})"
    if isinstance(e, RevisionNotFoundError):
        return f"the repo has no revision {revision!r}"
    if constants.HF_HUB_OFFLINE or isinstance(e, OfflineModeIsEnabled):
        return ("HF_HUB_OFFLINE is set and the Hub cache (HF_HUB_CACHE) holds no copy of it: download it "
                "once online, or unset HF_HUB_OFFLINE")
    if isinstance(e, EntryNotFoundError):
        return ("the Hub cannot be reached and its cache (HF_HUB_CACHE) holds no copy of it: check the "
                "network (or HF_ENDPOINT), or download it once where the Hub is reachable")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return f"the Hub at {constants.ENDPOINT} cannot be reached ({first}): check the network, HF_ENDPOINT"
    status = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
    if status == 401:  # the token sent is not one the Hub accepts (expired, revoked, mistyped)
        return (f"the Hub refused the token ({first}): {login} with a valid token"
                + (" that may write to it" if writing else " (a public repo needs none: unset HF_TOKEN)"))
    if status == 403:  # a valid token without the right
        return (f"the Hub refused the request ({first}): "
                + ("use a token that may write to it (a write token, on a repo you may write to)" if writing
                   else "your token may not read it: ask its owner for access, or use a token that may"))
    return f"{type(e).__name__}: {first}"


HUB_ERRORS = (HfHubHTTPError, EntryNotFoundError, HFValidationError, OfflineModeIsEnabled, httpx2.HTTPError,
              ConnectionError, TimeoutError)
"""What huggingface_hub raises when the Hub is unreachable, refuses, or lacks a repo, revision or file."""


@contextlib.contextmanager
def reading_repo(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn the Hub's errors while fetching `repo_id` into a ModelError naming it and the fix."""
    try:
        yield
    except HUB_ERRORS as e:
        at = repo_id + (f"@{revision}" if revision else "")
        raise ModelError(f"{at} is neither a local path nor a model reachable on the Hugging Face Hub: "
                         f"{_reason(e, repo_id, revision)}. Give {rundir.WHAT_LOADS}, or the id of a model "
                         "repo on the Hub (owner/name, optionally @revision)") from None


# --------------------------------------------------------------------------------------------- download
def download(repo_id: str, revision: str | None = None, **hub_kwargs) -> Path:
    """The local snapshot (in the Hub's cache) of an exported model on the Hub: model.safetensors, config.json
    and README.md. `hub_kwargs` go to `snapshot_download` (cache_dir, force_download, token,
    local_files_only). ModelError if it cannot be fetched or holds no sharnn model."""
    with reading_repo(repo_id, revision):
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=REPO_FILES,
                                          **hub_kwargs))
    missing = [name for name in (rundir.WEIGHTS_NAME, rundir.EXPORT_CONFIG_NAME)
               if not (snapshot / name).is_file()]
    if missing:
        raise ModelError(f"Hub repo {repo_id} holds no sharnn model: it lacks {' and '.join(missing)}. A "
                         f"sharnn model on the Hub is what `sharnn-export --push_to_hub {repo_id}` uploads")
    return snapshot


def upload(folder: str | Path, repo_id: str, private: bool | None = None,
           commit_message: str = "Upload sharnn model") -> str:
    """Create `repo_id` if needed and upload every file of `folder` in one commit (all of it or nothing);
    returns the commit's URL. The token is the Hub's (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi

    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"cannot upload to the Hugging Face Hub repo {repo_id}: {OFFLINE_UPLOAD}")
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=commit_message)
    except (*HUB_ERRORS, ValueError) as e:  # ValueError: the Hub rejected the card's metadata, or its reply
        raise ModelError(f"cannot upload to the Hugging Face Hub repo {repo_id}: "
                         f"{_reason(e, repo_id, None, writing=True)}") from None
    except (RuntimeError, OSError) as e:  # the weights' storage refused them: LFS (its signed URL), hf_xet
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"cannot upload to the Hugging Face Hub repo {repo_id}: its storage refused the "
                         f"files ({type(e).__name__}: {first}); try again later") from None
    return str(commit.commit_url)


OFFLINE_UPLOAD = "HF_HUB_OFFLINE is set, so nothing can be sent to the Hub; unset it to upload"


# ------------------------------------------------------------------------------------------- model card
@dataclass
class Provenance:
    """What the model card says about how a model was trained (None: not recorded)."""

    steps: int | None = None
    """Optimizer steps of the checkpoint the weights come from."""
    corpus: dict | None = None
    """The manifest of the prepared corpus the run trained on (sharnn.corpus.prepare)."""
    corpus_path: str | None = None
    """Where the run read its corpus (TrainConfig.data)."""
    test_bpc: float | None = None
    """The run's test bpc, when it was measured on this very checkpoint."""
    test_note: str | None = None
    """Why there is no test bpc, when the run measured one on another checkpoint."""
    best_val_bpc: float | None = None
    """The run's best validation bpc."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


PROVENANCE_KEY = "provenance"
"""The safetensors metadata key under which sharnn-export records the Provenance (JSON), so that exporting an
exported model again (another dtype, memory length) keeps its card's training facts."""


def run_provenance(source: ModelSource) -> Provenance:
    """Steps, corpus and test bpc of a checkpoint (from its config.yaml, the corpus manifest, the run's
    summary.json), or of an exported model (what sharnn-export recorded in its safetensors metadata)."""
    if source.kind != "checkpoint":
        from safetensors import safe_open

        with contextlib.suppress(OSError, ValueError, KeyError, TypeError), \
                safe_open(source.weights_path, "pt") as f:
            metadata = f.metadata() or {}
            if PROVENANCE_KEY in metadata:
                return Provenance(**json.loads(metadata[PROVENANCE_KEY]))
            return Provenance(steps=int(metadata["step"]) if metadata.get("step") else None)
        return Provenance()
    prov = Provenance(steps=source.step)
    data = (source.train_config or {}).get("data")
    if data:
        prov.corpus_path = str(data)
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((Path(data) / CORPUS_MANIFEST_NAME).read_text())
            prov.corpus = manifest if isinstance(manifest, dict) else None
    run_dir = source.path.parent.parent
    if source.path.parent.name != rundir.CHECKPOINTS_DIR:
        return prov
    with contextlib.suppress(OSError, ValueError, AttributeError):
        summary = json.loads((run_dir / SUMMARY_NAME).read_text())
        prov.best_val_bpc = summary.get("best_val_bpc")
        if summary.get("test_bpc") is not None:
            # the run tests its best checkpoint, else its latest (train/loop.py): only that one's bpc is ours
            tested = rundir.best_checkpoint(run_dir) or rundir.latest_checkpoint(run_dir)
            if tested is not None and tested.resolve() == source.path.resolve():
                prov.test_bpc = float(summary["test_bpc"])
            else:
                prov.test_note = (f"not measured on this checkpoint (the run's test bpc, "
                                  f"{summary['test_bpc']:.4f}, is of {tested.name if tested else 'another'})")
    return prov


def _corpus_line(prov: Provenance) -> str:
    if prov.corpus is None:
        return (f"not recorded (the run read `{prov.corpus_path}`, whose manifest.json is not there now)"
                if prov.corpus_path else "not recorded")
    source = prov.corpus.get("source") or {}
    kind = source.get("kind", "?") if isinstance(source, dict) else "?"
    details = {k: v for k, v in source.items() if k != "kind" and isinstance(v, (str, int, float))} \
        if isinstance(source, dict) else {}
    splits = prov.corpus.get("splits") or {}
    sizes = ", ".join(f"{name} {info.get('n_bytes', 0):,} bytes" for name, info in splits.items()
                      if isinstance(info, dict))
    train_sha = (splits.get("train") or {}).get("sha256") if isinstance(splits.get("train"), dict) else None
    line = f"`{kind}`" + (f" ({', '.join(f'{k}: {v}' for k, v in details.items())})" if details else "")
    line += f", prepared by sharnn-prepare: {sizes}" if sizes else ""
    return line + (f"; train split sha256 `{train_sha}`" if train_sha else "")


def model_card(config: ModelConfig, n_params: int, provenance: Provenance | None = None,
               repo_id: str | None = None, license: str | None = None) -> ModelCard:
    """The model card (README.md) of an exported model: the Hub metadata header (library_name, tags, license)
    from huggingface_hub's ModelCardData, then architecture, parameter count, corpus, steps, test bpc and
    how to load it."""
    prov = provenance or Provenance()
    data = ModelCardData(library_name=LIBRARY_NAME, tags=list(TAGS), license=license,
                         pipeline_tag="text-generation")
    name = repo_id or "PATH/TO/MODEL"
    arch = "\n".join(f"| `{k}` | {v} |" for k, v in config.to_dict().items())
    if prov.test_bpc is not None:
        test = f"{prov.test_bpc:.4f} bits per byte (the run's test split)"
    else:
        test = prov.test_note or "not measured"
    lines = [
        f"# {repo_id.split('/')[-1] if repo_id else 'SHA-RNN byte-level language model'}",
        "",
        "A byte-level SHA-RNN language model (Merity 2019, [Single Headed Attention RNN: Stop Thinking With "
        f"Your Head]({PAPER_URL})), trained with sharnn, a reimplementation of the author's "
        "code. It reads and predicts bytes (vocabulary 256); the LSTM state and attention "
        "memory are carried from one segment to the next.",
        "",
        "## Architecture",
        "",
        "| ModelConfig field | value |",
        "|---|---|",
        arch,
        "",
        f"Parameters: {n_params:,}",
        "",
        "## Training",
        "",
        f"- Corpus: {_corpus_line(prov)}",
        f"- Steps: {prov.steps if prov.steps is not None else 'not recorded'}",
        f"- Test bpc: {test}",
    ]
    if prov.best_val_bpc is not None:
        lines.append(f"- Best validation bpc of the run: {prov.best_val_bpc:.4f}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from sharnn import SHARNN",
        f'model = SHARNN.from_pretrained("{name}")  # eval mode, on the CPU',
        "logits, _, state = model(x)                  # x: (T, B) int64 bytes; pass `state` to the next call",
        "```",
        "",
        "```sh",
        f"sharnn-generate {name} --prompt 'The '",
        f"sharnn-eval {name} --data CORPUS",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
