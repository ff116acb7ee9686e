"""The Hugging Face Hub (sharnn/io/hub.py), without the network: `SHARNN.from_pretrained` loads what
`load_model` loads; repo ids from the Hub's cache (laid out as the Hub does, HF_HUB_OFFLINE) in load_model,
sharnn-eval, sharnn-generate and --init_from; a missing repo is one `error:` line; the model card. Then
against StandInHub, a stand-in of the Hub's HTTP API that answers as the Hub does (tokens, 409 for an
existing repo, LFS and Xet storage for the weights, gated and private repos, revisions): `sharnn-export
--push_to_hub` and `model.push_to_hub`, pushed twice, the files that arrive compared byte for byte;
downloads, then loading offline from the cache; each refusal of the Hub as one error line."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from safetensors import safe_open

from sharnn import SHARNN, ModelConfig
from sharnn.io.pretrained import ModelError, find_model, load_model, save_model
from tests.helpers import exits_with, tiny_config

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # huggingface_hub's LFS upload hands httpx2 a file object, which httpx2 deprecates
              pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")]

TINY = tiny_config(d_model=32, d_ff=64, mem_len=16)
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
    from train.eval_command import main as evaluate

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


def test_eval_and_generate_take_a_repo_id(offline_cache, small_corpus, tmp_path, capsysbinary):
    from sharnn.generate import main as generate
    from train.eval_command import main as evaluate

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


# ------------------------------------------------------------------------------ the Hub, stood in for
# Each answer below is the one huggingface_hub 2.4.0 (hf_api.create_repo, upload_folder, _commit_api, lfs,
# file_download, _snapshot_download) asks for and acts on: the status, the X-Error-Code and X-Error-Message
# headers its hf_raise_for_status turns into RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError,
# EntryNotFoundError, and the headers of a file download (X-Repo-Commit, ETag, X-Linked-*, X-Xet-*).
TOKENS = {"hf_alice": "alice", "hf_bob": "bob"}
"""The tokens the stand-in accepts, and whose they are; any other token is refused (401)."""
LFS_PATTERNS = ("*.safetensors", "*.onnx", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.npz")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
"""The .gitattributes of a new repo's first commit (the Hub's default lists these patterns, among others)."""
LFS_MIN_BYTES = 10 * 1024 * 1024
"""Files this large go to LFS whatever their name; the Hub refuses them in a commit's body."""


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Lfs:
    """A file kept out of git (LFS or Xet storage): what its pointer says, and its Xet hash if it came
    through Xet."""

    sha256: str
    size: int
    xet_hash: str | None = None

    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n").encode()


@dataclass
class Repo:
    owner: str
    private: bool = False
    gated: bool = False
    accepted: set[str] = field(default_factory=set)
    """Who accepted a gated repo's conditions."""
    commits: dict[str, dict[str, bytes | Lfs]] = field(default_factory=dict)
    """Commit id -> the tree at that commit (path -> content, or the LFS pointer)."""
    refs: dict[str, str] = field(default_factory=dict)
    """Branches and tags -> commit id."""


class HubError(Exception):
    """An error answer: `status`, {"error": message, **body}, the X-Error-Message and X-Error-Code headers."""

    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None,
                 **headers: str):
        super().__init__(message)
        self.status, self.message, self.code, self.body, self.headers = status, message, code, body, headers


def xet_files(cas: Path) -> dict[str, tuple[str, int]]:
    """sha256 -> (Xet hash, size) of every file that hf_xet registered in the shards of a local:// Xet store.
    A shard (xet-core mdb_shard) opens with a 48-byte header, then per file a 48-byte header (hash, flags,
    number of entries), its 48-byte entries (the third u32 of each: bytes it holds), as many verification
    entries if flag bit 31, a 48-byte metadata entry (sha256) if bit 30; a hash of all 0xff ends the list.
    Hashes are four little-endian u64s, written in hex u64 by u64."""
    def hexed(raw: bytes) -> str:
        return b"".join(raw[i:i + 8][::-1] for i in range(0, 32, 8)).hex()

    found = {}
    for shard in cas.rglob("*.mdb"):
        data, pos = shard.read_bytes(), 48
        while data[pos:pos + 32] != b"\xff" * 32:
            file_hash, (flags, n) = data[pos:pos + 32], struct.unpack_from("<II", data, pos + 32)
            size = sum(struct.unpack_from("<I", data, pos + 48 * (i + 1) + 36)[0] for i in range(n))
            pos += 48 * (n + 1) + (48 * n if flags >> 31 & 1 else 0)
            if flags >> 30 & 1:
                found[hexed(data[pos:pos + 32])] = (hexed(file_hash), size)
                pos += 48
    return found


class StandInHub:
    """The Hub's HTTP API as huggingface_hub uses it to create a repo, upload a folder and download a
    snapshot, answering as the Hub does:

    - POST /api/repos/create: 401 without a token (or with one not in TOKENS), 403 in another user's
      namespace, 409 if the repo exists; a new repo has a first commit holding .gitattributes (LFS_PATTERNS).
    - POST /api/models/{repo}/preupload/{rev}: "lfs" for files that .gitattributes or LFS_MIN_BYTES send to
      LFS (model.safetensors), "regular" otherwise, each with the oid of the file already there, if any (the
      client then leaves unchanged files out of the commit).
    - LFS: POST /{repo}.git/info/lfs/objects/batch answers "basic" transfers: a signed PUT to the storage
      host (another origin, like S3: it refuses an Authorization header), then POST .../objects/verify,
      where the Hub checks the object's sha256 and size. Xet (what huggingface_hub uses when hf_xet is
      installed): GET /api/models/{repo}/xet-write-token/{rev} names a Xet store; it is a local:// store in
      `xet_dir`, which hf_xet writes itself (the stand-in does not speak the Xet CAS protocol) and which
      `xet_files` reads back.
    - POST /api/models/{repo}/commit/{rev} (NDJSON): "file" lines inline, "lfsFile" lines only for an object
      the storage holds with that sha256 and size (422 otherwise); a file that belongs in LFS sent inline
      is refused (400), as the Hub refuses binary files in git.
    - GET /api/models/{repo}[/revision/{rev}], /api/models/{repo}/tree/{rev}, and HEAD/GET
      /{repo}/resolve/{rev}/{path}: a regular file is served with ETag (its git blob id) and X-Repo-Commit,
      an LFS file is a 302 to the storage host with X-Linked-Etag (its sha256) and X-Linked-Size (and
      X-Xet-Hash with a xet-auth Link when it came through Xet: GET /api/models/{repo}/xet-read-token/{rev}).
    - Errors carry the Hub's X-Error-Code: a missing repo, or a private one to anyone but its owner, is
      RepoNotFound (401 without a token, 404 with one); an unknown branch, tag or commit RevisionNotFound
      (404); a gated repo's files GatedRepo (401 without a token, 403 for a user who has not accepted its
      conditions); a missing file EntryNotFound. Writing to another user's repo is 403.

    `requests` lists (method, path, status) of every answer, the storage host's included."""

    def __init__(self, xet_dir: Path):
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS objects stored and verified, by sha256
        self.unverified: dict[str, bytes] = {}  # PUT to the storage, not yet verified
        self.xet_dir = xet_dir
        self.created: list[dict] = []
        self.validated: list[str] = []
        self.tokens_seen: set[str | None] = set()
        self.requests: list[tuple[str, str, int]] = []
        self._secret = os.urandom(8).hex()
        self.api = self._serve(self._api_routes())
        self.storage = self._serve([("PUT", r"/(?P<oid>[0-9a-f]{64})", self.storage_put),
                                    ("GET", r"/(?P<oid>[0-9a-f]{64})", self.storage_get)])
        self.url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self.storage.server_address[1]}"

    # ------------------------------------------------------------------------------ for the tests
    def put(self, repo_id: str, files: dict[str, bytes], private: bool = False, gated: bool = False,
            message: str = "add files") -> str:
        """Create `repo_id` (if new) and commit `files` to main as an upload would (LFS files through LFS);
        returns the commit id."""
        owner = repo_id.split("/")[0]
        repo = self.repos.get(repo_id) or self._new_repo(repo_id, owner, private)
        repo.gated = repo.gated or gated
        tree = dict(repo.commits[repo.refs["main"]])
        for path, data in files.items():
            if self._goes_to_lfs(tree, path, len(data)):
                oid = hashlib.sha256(data).hexdigest()
                self.objects[oid] = data
                tree[path] = Lfs(oid, len(data))
            else:
                tree[path] = data
        return self._commit(repo, "main", tree, message)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """What a checkout of `rev` holds, .gitattributes left out: LFS files as their content, taken back
        from the LFS objects or rebuilt from the Xet store by hf_xet."""
        tree = self.repos[repo_id].commits[self._commit_id(self.repos[repo_id], rev)]
        return {path: self._content(f) if isinstance(f, Lfs) else f for path, f in tree.items()
                if path != ".gitattributes"}

    def lfs_paths(self, repo_id: str, rev: str = "main") -> dict[str, str]:
        """path -> "lfs" or "xet", for the files of `rev` kept out of git."""
        tree = self.repos[repo_id].commits[self._commit_id(self.repos[repo_id], rev)]
        return {p: "xet" if f.xet_hash else "lfs" for p, f in tree.items() if isinstance(f, Lfs)}

    def history(self, repo_id: str) -> int:
        """How many commits the repo has (its first, .gitattributes, included)."""
        return len(self.repos[repo_id].commits)

    def close(self):
        for server in (self.api, self.storage):
            server.shutdown()
            server.server_close()

    # ------------------------------------------------------------------------------------ plumbing
    def _serve(self, routes) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # a streamed PUT
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def answer(self):
                self.data = self.body()  # read before answering: an early refusal must not cut the upload
                path = urlsplit(self.path).path
                route = next(((f, m.groupdict()) for method, pattern, f in routes
                              if method == self.command or (method, self.command) == ("GET", "HEAD")
                              if (m := re.fullmatch(pattern, path))), None)
                try:
                    if route is None:
                        raise HubError(404, "Sorry, we can't find the page you are looking for.")
                    f, args = route
                    reply = f(self, **{k: unquote(v) for k, v in args.items() if v is not None})
                    status, headers, data = reply if isinstance(reply, tuple) else (200, {}, reply)
                except HubError as e:
                    status, data = e.status, {"error": e.message, **(e.body or {})}
                    headers = {"X-Error-Message": e.message, **e.headers}
                    if e.code:
                        headers["X-Error-Code"] = e.code
                hub.requests.append((self.command, path, status))
                if not isinstance(data, bytes):
                    data = json.dumps(data).encode()
                    headers.setdefault("Content-Type", "application/json")
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = answer

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return server

    def _api_routes(self):
        repo, rev = r"(?P<repo_id>[\w.-]+/[\w.-]+)", r"(?P<rev>[^/]+)"
        return [
            ("POST", r"/api/repos/create", self.create),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", rf"/api/models/{repo}/preupload/{rev}", self.preupload),
            ("POST", rf"/api/models/{repo}/commit/{rev}", self.commit),
            ("GET", rf"/api/models/{repo}/xet-(?P<kind>read|write)-token/{rev}", self.xet_token),
            ("GET", rf"/api/models/{repo}(?:/revision/{rev})?", self.repo_info),
            ("GET", rf"/api/models/{repo}/tree/{rev}", self.tree),
            ("POST", rf"/{repo}\.git/info/lfs/objects/batch", self.lfs_batch),
            ("POST", rf"/{repo}\.git/info/lfs/objects/verify", self.lfs_verify),
            ("GET", rf"/{repo}/resolve/{rev}/(?P<path>.+)", self.resolve),
        ]

    def _user(self, request) -> str | None:
        auth = request.headers.get("Authorization")
        self.tokens_seen.add(auth)
        if auth is None:
            return None
        user = TOKENS.get(auth.removeprefix("Bearer "))
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):  # the Hub does not tell them apart
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "Invalid username or password.")
        repo = self._readable(repo_id, user)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _downloadable(self, repo_id: str, user: str | None) -> Repo:
        repo = self._readable(repo_id, user)
        if repo.gated and user not in repo.accepted and user != repo.owner:
            raise HubError(401 if user is None else 403, f"Access to model {repo_id} is restricted and you "
                           f"are not in the authorized list. Visit {self.url}/{repo_id} to ask for access.",
                           "GatedRepo")
        return repo

    @staticmethod
    def _commit_id(repo: Repo, rev: str) -> str:
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    @staticmethod
    def _goes_to_lfs(tree: dict, path: str, size: int) -> bool:
        patterns = [line.split()[0] for line in tree[".gitattributes"].decode().splitlines()
                    if "filter=lfs" in line]
        return size >= LFS_MIN_BYTES or any(fnmatch.fnmatch(path.rsplit("/")[-1], p) for p in patterns)

    def _new_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = self.repos[repo_id] = Repo(owner, private)
        self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        return repo

    @staticmethod
    def _commit(repo: Repo, branch: str, tree: dict, message: str) -> str:
        parent = repo.refs.get(branch, "")
        listing = sorted((p, f.sha256 if isinstance(f, Lfs) else git_blob_id(f)) for p, f in tree.items())
        commit = hashlib.sha1(json.dumps([parent, listing, message]).encode()).hexdigest()
        repo.commits[commit] = tree
        repo.refs[branch] = commit
        return commit

    def _stored(self, oid: str) -> tuple[int, str | None] | None:
        """(size, Xet hash) of an object the storage holds, or None."""
        if oid in self.objects:
            return len(self.objects[oid]), None
        if oid in (xet := xet_files(self.xet_dir)):
            return xet[oid][1], xet[oid][0]
        return None

    def _content(self, f: Lfs) -> bytes:
        if f.xet_hash is None:
            return self.objects[f.sha256]
        import hf_xet

        with tempfile.TemporaryDirectory() as tmp:
            with hf_xet.XetSession().new_file_download_group(
                    endpoint=f"local://{self.xet_dir}", token="xet", custom_headers={},
                    token_expiry_unix_secs=int(time.time()) + 60, token_refresh_url=None,
                    token_refresh_headers=None, progress_callback=None) as group:
                group.start_download_file(hf_xet.XetFileInfo(f.xet_hash, f.size), f"{tmp}/file")
            return Path(f"{tmp}/file").read_bytes()

    def _signature(self, oid: str) -> str:
        return hashlib.sha256((self._secret + oid).encode()).hexdigest()

    def _signed(self, oid: str) -> str:
        """A presigned storage URL for an object, as the Hub hands out (S3's query signature)."""
        return f"{self.storage_url}/{oid}?X-Amz-Signature={self._signature(oid)}"

    def _check_signed(self, request, oid: str) -> None:
        if request.headers.get("Authorization"):  # S3: a presigned URL and an Authorization header conflict
            raise HubError(400, "Only one auth mechanism allowed")
        if parse_qs(urlsplit(request.path).query).get("X-Amz-Signature") != [self._signature(oid)]:
            raise HubError(403, "SignatureDoesNotMatch")

    # ----------------------------------------------------------------------------------- endpoints
    def create(self, request):
        user = self._user(request)
        body = json.loads(request.data)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        owner = body.get("organization") or user
        repo_id = f"{owner}/{body['name']}"
        if owner != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{owner}"')
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", body={"url": f"{self.url}/{repo_id}"})
        self.created.append(body)
        self._new_repo(repo_id, owner, body.get("visibility") == "private")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, request):
        self.validated.append(json.loads(request.data)["content"])
        return {"errors": [], "warnings": []}

    def preupload(self, request, repo_id, rev):
        repo = self._writable(repo_id, self._user(request))
        tree = repo.commits[self._commit_id(repo, rev)]
        files = []
        for f in json.loads(request.data)["files"]:
            lfs = self._goes_to_lfs(tree, f["path"], f["size"])
            old = tree.get(f["path"])
            oid = None if old is None else old.sha256 if isinstance(old, Lfs) else git_blob_id(old)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return {"files": files}

    def lfs_batch(self, request, repo_id):
        self._writable(repo_id, self._user(request))
        body = json.loads(request.data)
        if body["operation"] != "upload" or "basic" not in body["transfers"]:
            raise HubError(400, "only basic uploads")
        objects = []
        for o in body["objects"]:
            if o["oid"] in self.objects:  # already stored: nothing to send
                objects.append({"oid": o["oid"], "size": o["size"]})
                continue
            objects.append({"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                "upload": {"href": self._signed(o["oid"]), "expires_in": 900},
                "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"}}})
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic",
                                                                       "objects": objects}

    def storage_put(self, request, oid):
        self._check_signed(request, oid)
        self.unverified[oid] = request.data
        return b""

    def lfs_verify(self, request, repo_id):
        self._writable(repo_id, self._user(request))
        body = json.loads(request.data)
        data = self.unverified.pop(body["oid"], None)
        if data is None or hashlib.sha256(data).hexdigest() != body["oid"] or len(data) != body["size"]:
            raise HubError(422, f"object {body['oid']} was not uploaded, or not as announced")
        self.objects[body["oid"]] = data
        return {"message": "verified"}

    def xet_token(self, request, repo_id, kind, rev):
        user = self._user(request)
        repo = self._writable(repo_id, user) if kind == "write" else self._downloadable(repo_id, user)
        self._commit_id(repo, rev)
        expires = int(time.time()) + 3600
        return 200, {"X-Xet-Cas-Url": f"local://{self.xet_dir}", "X-Xet-Access-Token": "xet",
                     "X-Xet-Token-Expiration": str(expires)}, \
            {"casUrl": f"local://{self.xet_dir}", "accessToken": "xet", "exp": expires}

    def commit(self, request, repo_id, rev):
        repo = self._writable(repo_id, self._user(request))
        lines = [json.loads(line) for line in request.data.splitlines()]
        tree = dict(repo.commits[self._commit_id(repo, rev)])
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                if self._goes_to_lfs(tree, value["path"], len(data)):
                    raise HubError(400, "Your push was rejected because it contains binary files. Please "
                                   "use https://huggingface.co/docs/hub/xet to store binary files: "
                                   + value["path"])
                tree[value["path"]] = data
            elif key == "lfsFile":
                stored = self._stored(value["oid"])
                if stored is None or stored[0] != value["size"]:
                    raise HubError(422, "Your push was rejected because an LFS pointer pointed to a file "
                                   f"that does not exist. Offending file: - {value['path']}")
                tree[value["path"]] = Lfs(value["oid"], value["size"], stored[1])
            elif key in ("deletedFile", "deletedFolder"):
                tree = {p: f for p, f in tree.items() if p != value["path"]
                        and not p.startswith(value["path"].rstrip("/") + "/")}
        commit = self._commit(repo, rev, tree, lines[0]["value"]["summary"])
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{commit}", "commitOid": commit, "success": True}

    def repo_info(self, request, repo_id, rev="main"):
        repo = self._readable(repo_id, self._user(request))
        commit = self._commit_id(repo, rev)
        return {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])]}

    def tree(self, request, repo_id, rev):
        repo = self._readable(repo_id, self._user(request))
        entries = []
        for path, f in sorted(repo.commits[self._commit_id(repo, rev)].items()):
            if isinstance(f, Lfs):
                entry = {"type": "file", "oid": git_blob_id(f.pointer()), "size": f.size, "path": path,
                         "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer())}}
                if f.xet_hash:
                    entry["xetHash"] = f.xet_hash
            else:
                entry = {"type": "file", "oid": git_blob_id(f), "size": len(f), "path": path}
            entries.append(entry)
        return entries

    def resolve(self, request, repo_id, rev, path):
        repo = self._downloadable(repo_id, self._user(request))
        commit = self._commit_id(repo, rev)
        f = repo.commits[commit].get(path)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit})
        if not isinstance(f, Lfs):
            return 200, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(f)}"'}, f
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(f.pointer())}"', "X-Linked-Etag":
                   f'"{f.sha256}"', "X-Linked-Size": str(f.size), "Location": self._signed(f.sha256)}
        if f.xet_hash:
            headers["X-Xet-Hash"] = f.xet_hash
            headers["Link"] = f'<{self.url}/api/models/{repo_id}/xet-read-token/{commit}>; rel="xet-auth"'
        return 302, headers, b""

    def storage_get(self, request, oid):
        self._check_signed(request, oid)
        stored = self._stored(oid)
        if stored is None:
            raise HubError(404, "NoSuchKey")
        return self._content(Lfs(oid, stored[0], stored[1]))


@pytest.fixture
def stand_in_hub(tmp_path, monkeypatch):
    """The stand-in, with this process's huggingface_hub pointed at it (HF_ENDPOINT is read at import, so the
    constants made from it are set instead), an empty Hub cache, alice's token in HF_TOKEN (no token file)."""
    hub = StandInHub(tmp_path / "xet-store")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_TOKEN", "hf_alice")
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))
    monkeypatch.chdir(tmp_path)  # so that no local directory could shadow a repo id
    yield hub
    hub.close()


@pytest.fixture(params=["xet", "lfs"])
def transfer(request, monkeypatch) -> str:
    """How large files travel: through Xet storage (huggingface_hub's way when hf_xet is installed, as it is
    here and in a default install) or through LFS (its way without hf_xet, or with HF_HUB_DISABLE_XET)."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "lfs")
    return request.param


def model_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model_dir.iterdir()}


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message.strip(), message
    return message


# ----------------------------------------------------------------------------------------- uploading
def test_push_and_push_again(stand_in_hub, transfer, tiny_model, tmp_path):
    """The weights go to LFS (or Xet storage) as the Hub asks; a second push goes to the repo, now existing
    (the Hub answers 409 to its creation), as a new commit; an unchanged folder adds no commit."""
    from sharnn.io.hub import upload as hub_upload
    from train.export import main as export

    hub = stand_in_hub
    out = tmp_path / "out"
    assert export([str(tiny_model), "--out", str(out), "--push_to_hub", "alice/tiny"]) == 0
    assert hub.files("alice/tiny") == model_files(out)  # every file, byte for byte
    assert sorted(hub.files("alice/tiny")) == ["README.md", "config.json", "model.safetensors"]
    assert hub.lfs_paths("alice/tiny") == {"model.safetensors": transfer}
    lfs = [("POST", f"/alice/tiny.git/info/lfs/objects/{verb}") for verb in ("batch", "verify")]
    assert [(method, path) for method, path, _ in hub.requests if "lfs/objects" in path or "xet" in path] == (
        lfs if transfer == "lfs" else [("GET", "/api/models/alice/tiny/xet-write-token/main")])
    assert hub.history("alice/tiny") == 2  # the repo's first commit, then the upload
    assert hub.tokens_seen == {"Bearer hf_alice"}  # (the storage host refuses any: its URLs are signed)

    # pushed again: the repo exists (the Hub answers 409 to its creation), the export is a new commit on top
    # (sharnn-export's bytes differ from one export to the next: safetensors writes the metadata in any order)
    assert export([str(tiny_model), "--out", str(tmp_path / "again"), "--push_to_hub", "alice/tiny"]) == 0
    assert ("POST", "/api/repos/create", 409) in hub.requests
    assert hub.history("alice/tiny") == 3 and hub.files("alice/tiny") == model_files(tmp_path / "again")

    # the same folder again: the client sees from the Hub's answer that nothing changed, and commits nothing
    assert hub_upload(tmp_path / "again", "alice/tiny").endswith(hub.repos["alice/tiny"].refs["main"])
    assert hub.history("alice/tiny") == 3
    assert len(hub.created) == 1


def test_push_without_out_and_through_the_mixin(stand_in_hub, tiny_model, capsys):
    from safetensors.torch import load, load_file

    from train.export import main as export

    want = load_file(tiny_model / "model.safetensors")
    # sharnn-export --push_to_hub without --out: a temporary export, uploaded, then removed
    assert export([str(tiny_model), "--push_to_hub", "alice/only"]) == 0
    arrived = stand_in_hub.files("alice/only")
    assert sorted(arrived) == ["README.md", "config.json", "model.safetensors"]
    assert same_tensors(load(arrived["model.safetensors"]), want)
    assert not stand_in_hub.repos["alice/only"].private  # public unless --private
    temporary = re.search(r"uploaded (\S+) to alice/only", capsys.readouterr().err)[1]
    assert not Path(temporary).exists()  # the temporary export was removed

    # the Python API: model.push_to_hub through huggingface_hub's mixin, in sharnn's format
    SHARNN.from_pretrained(str(tiny_model)).push_to_hub("alice/mixin")
    arrived = stand_in_hub.files("alice/mixin")
    assert sorted(arrived) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(arrived["config.json"]) == TINY.to_dict()
    assert same_tensors(load(arrived["model.safetensors"]), want)
    assert ModelCard(arrived["README.md"].decode()).data.library_name == "sharnn"


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case, fragments", [
    ("no token", ["cannot upload to the Hugging Face Hub repo alice/tiny", "401", "hf auth login",
                  "a valid token that may write to it"]),
    ("a refused token", ["cannot upload to the Hugging Face Hub repo alice/tiny", "401",
                         "a valid token that may write to it"]),
    ("another user's repo", ["cannot upload to the Hugging Face Hub repo bob/public", "403",
                             "use a token that may write to it"]),
])
def test_a_refused_push_is_one_error_line(stand_in_hub, tiny_model, tmp_path, monkeypatch, case, fragments):
    from train.export import main as export

    stand_in_hub.put("bob/public", model_files(tiny_model))
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "a refused token":
        monkeypatch.setenv("HF_TOKEN", "hf_expired")
    repo_id = "bob/public" if case == "another user's repo" else "alice/tiny"
    out = tmp_path / "out"
    message = exits_with(export, [str(tiny_model), "--out", str(out), "--push_to_hub", repo_id], *fragments,
                         f"the export in {out} is complete")
    assert "\n" not in message
    assert sorted(stand_in_hub.repos) == ["bob/public"] and stand_in_hub.history("bob/public") == 2


def test_storage_that_refuses_the_weights_is_one_error_line(stand_in_hub, transfer, tiny_model, tmp_path,
                                                            monkeypatch):
    """The Hub takes the repo and the commit's small files, but the storage refuses the weights: a signed
    upload URL that has expired (LFS: the storage host's 403), a Xet store that cannot be written."""
    from train.export import main as export

    def expired(request, oid):
        raise HubError(403, "Request has expired")

    monkeypatch.setattr(stand_in_hub, "_check_signed", expired)
    stand_in_hub.xet_dir = tmp_path / "a file" / "xet"
    (tmp_path / "a file").write_text("x")
    out = tmp_path / "out"
    message = exits_with(export, [str(tiny_model), "--out", str(out), "--push_to_hub", "alice/tiny"],
                         "cannot upload to the Hugging Face Hub repo alice/tiny",
                         f"the export in {out} is complete")
    assert "\n" not in message and stand_in_hub.history("alice/tiny") == 1


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


# --------------------------------------------------------------------------------------- downloading
def test_download_once_then_load_offline(stand_in_hub, transfer, tiny_model, monkeypatch):
    """A pushed model downloads from the Hub (only the files of a sharnn model), then loads from the Hub's
    cache with HF_HUB_OFFLINE and the Hub gone."""
    hub = stand_in_hub
    want = logits(load_model(tiny_model))
    SHARNN.from_pretrained(str(tiny_model)).push_to_hub("alice/tiny")
    hub.put("alice/tiny", {"model.onnx": os.urandom(3000), "notes.txt": b"not part of the model"})
    monkeypatch.delenv("HF_TOKEN")  # a public repo needs none

    assert torch.equal(logits(load_model("alice/tiny")), want)
    fetched = sorted({path.rsplit("/", 1)[1] for method, path, _ in hub.requests if "/resolve/" in path})
    assert fetched == (["README.md", "config.json"] if transfer == "xet" else  # the weights came from Xet
                       ["README.md", "config.json", "model.safetensors"])
    main = hub.repos["alice/tiny"].refs["main"]
    weights = hub.repos["alice/tiny"].commits[main]["model.safetensors"]
    storage = [path for method, path, _ in hub.requests if method == "GET" and (
        "xet-read-token" in path or re.fullmatch(r"/[0-9a-f]{64}", path))]
    assert storage == [f"/api/models/alice/tiny/xet-read-token/{main}" if transfer == "xet" else
                       f"/{weights.sha256}"]

    hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert torch.equal(logits(load_model("alice/tiny")), want)
    assert torch.equal(logits(SHARNN.from_pretrained("alice/tiny")), want)
    assert len(hub.requests) == seen


def test_a_missing_or_private_repo_is_one_error_line(stand_in_hub, tiny_model, monkeypatch):
    from sharnn.generate import main as generate

    stand_in_hub.put("alice/secret", model_files(tiny_model), private=True)
    for token in (None, "hf_bob"):  # the Hub answers 401 without a token, 404 with one
        if token is None:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        else:
            monkeypatch.setenv("HF_TOKEN", token)
        for repo_id in ("alice/missing", "alice/secret"):
            with pytest.raises(ModelError) as e:
                load_model(repo_id)
            assert (f"{repo_id} is neither a local path nor a model reachable on the Hugging Face Hub: the "
                    f"Hub has no model repo {repo_id} (if it is private, log in with `hf auth login` or set "
                    "HF_TOKEN)") in one_line(e)
        exits_with(generate, ["alice/secret", "--length", "5"], "the Hub has no model repo alice/secret")
    monkeypatch.setenv("HF_TOKEN", "hf_alice")  # its owner's token reads it
    assert torch.equal(logits(load_model("alice/secret")), logits(load_model(tiny_model)))


def test_a_gated_repo_says_so(stand_in_hub, tiny_model, monkeypatch):
    stand_in_hub.put("alice/gated", model_files(tiny_model), gated=True)
    for token in (None, "hf_bob"):  # 401 without a token, 403 for a user who has not accepted its conditions
        if token is None:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        else:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(ModelError) as e:
            SHARNN.from_pretrained("alice/gated")
        assert ("alice/gated is neither a local path nor a model reachable on the Hugging Face Hub: the repo "
                "is gated: accept its conditions on the Hub, then log in with `hf auth login` or set HF_TOKEN"
                ) in one_line(e)
    stand_in_hub.repos["alice/gated"].accepted.add("bob")
    assert torch.equal(logits(load_model("alice/gated")), logits(load_model(tiny_model)))


def test_a_missing_revision_says_so(stand_in_hub, tiny_model, tmp_path):
    from train.eval_command import main as evaluate

    first = stand_in_hub.put("alice/tiny", model_files(tiny_model))
    stand_in_hub.repos["alice/tiny"].refs["v1"] = first
    stand_in_hub.put("alice/tiny", {"README.md": b"# rewritten\n"})
    with pytest.raises(ModelError) as e:
        load_model("alice/tiny@v2")
    assert ("alice/tiny@v2 is neither a local path nor a model reachable on the Hugging Face Hub: the repo "
            "has no revision 'v2'") in one_line(e)
    exits_with(evaluate, ["alice/tiny@v2", "--data", str(tmp_path)], "the repo has no revision 'v2'")
    want = logits(load_model(tiny_model))
    for revision in ("v1", first, "main"):  # a tag, a commit, a branch
        assert torch.equal(logits(load_model(f"alice/tiny@{revision}")), want)


def test_a_repo_without_a_sharnn_model_says_what_it_lacks(stand_in_hub):
    stand_in_hub.put("alice/notes", {"README.md": b"# notes\n"})
    with pytest.raises(ModelError) as e:
        load_model("alice/notes")
    assert ("Hub repo alice/notes holds no sharnn model: it lacks model.safetensors and config.json"
            in one_line(e))


def test_a_refused_token_on_download_asks_for_one_that_may_read(stand_in_hub, tiny_model, tmp_path,
                                                                 monkeypatch):
    """Issue 26: a 401 on a download advised "a token that may write to it"."""
    from train.export import main as export

    stand_in_hub.put("alice/tiny", model_files(tiny_model))
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    with pytest.raises(ModelError) as refused:
        load_model("alice/tiny")
    message = one_line(refused)
    assert "401" in message and "valid token" in message and "write" not in message, message
    exits_with(export, [str(tiny_model), "--out", str(tmp_path / "out"), "--push_to_hub", "alice/tiny"],
               "401", "valid token that may write to it")
