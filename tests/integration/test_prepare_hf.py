"""sharnn-prepare hf: datasets made here (save_to_disk, parquet and JSON lines folders, a builder with
data files) become corpora whose splits are exactly their records' text; bad input is one `error:` line; a
dataset larger than the process's memory limit is prepared. Nothing touches the network: the Hub is switched
off where a name could reach it.
"""

from __future__ import annotations

import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharnn.corpus.data import read_manifest
from tests.helpers import REPO, subprocess_env

# --- bounded memory -----------------------------------------------------------------------------------------

# The child sets RLIMIT_DATA after its imports, to what they use plus HEADROOM_BYTES. RLIMIT_DATA (Linux >=
# 4.7) caps private writable memory: the heap, anonymous maps, thread stacks, what any copy of the text would
# need. It does not count read-only file maps (the page cache that Arrow's and numpy's memory maps read
# through), which is the point: the corpus is read through maps, never copied whole. RLIMIT_AS would count
# those maps too, and torch alone reserves more address space than the data (VmData is ~1.4 GB after the
# imports, VmSize ~2 GB), so an address-space limit cannot tell streaming from loading. The child first
# checks that the limit bites: allocating the text's size must fail.
HEADROOM_BYTES = 128 * 2**20
TEXT_BYTES = 320 * 10**6  # 2.4 x the headroom
CHILD = """
import resource, sys
from sharnn.corpus.hf import HFSource, prepare_hf

def vm_data():
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))

headroom, text_bytes, dataset, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
limit = vm_data() + headroom
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:
    bytearray(text_bytes)
    sys.exit("the memory limit does not bite: the text fits in memory")
except MemoryError:
    pass
result = prepare_hf(HFSource(dataset), out)
print(result.manifest["total_bytes"])
"""


def write_parquet_text(directory, n_bytes: int, row_bytes: int = 16384) -> bytes:
    """A train split of about `n_bytes` of text, rows of `row_bytes`, in parquet shards of 256-row groups;
    returns the first row."""
    import numpy as np

    directory.mkdir()
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \n.,", dtype=np.uint8)
    pool = letters[rng.integers(0, len(letters), 2**21)].tobytes().decode()
    n_rows, rows_per_file = n_bytes // row_bytes, 2048
    for first in range(0, n_rows, rows_per_file):
        rows = [pool[(i * 7919) % (len(pool) - row_bytes):][:row_bytes]
                for i in range(first, min(n_rows, first + rows_per_file))]
        pq.write_table(pa.table({"text": rows}), directory / f"train-{first // rows_per_file:05d}.parquet",
                       row_group_size=256)
    return pool[:row_bytes].encode()


@pytest.mark.slow
def test_a_dataset_larger_than_the_memory_limit(tmp_path):
    first_row = write_parquet_text(tmp_path / "big", TEXT_BYTES)
    command = [sys.executable, "-c", CHILD, str(HEADROOM_BYTES), str(TEXT_BYTES), str(tmp_path / "big"),
               str(tmp_path / "c")]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total_bytes = int(proc.stdout)
    n_rows = TEXT_BYTES // 16384
    assert total_bytes == n_rows * 16384 + (n_rows - 1)  # the rows and a newline between each two
    assert total_bytes > 2 * HEADROOM_BYTES
    manifest = read_manifest(tmp_path / "c")
    assert sum(s["n_bytes"] for s in manifest["splits"].values()) == total_bytes
    train = datasets.load_from_disk(str(tmp_path / "c" / "train"))
    assert train[0]["bytes"][:len(first_row) + 1] == first_row + b"\n"


def test_python_dash_m_prints_one_error_line(tmp_path):
    """`python -m sharnn.corpus.prepare hf` bad input: the hf module's PrepareError was another class than
    the one
    __main__ catches, so every error was a traceback."""
    proc = subprocess.run([sys.executable, "-m", "sharnn.corpus.prepare", "hf", "json", "--data_files",
                           str(tmp_path / "none*.jsonl"), "--out", str(tmp_path / "c")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, \
        proc.stderr


def test_no_network_is_one_line_at_once(tmp_path):
    """Without the network: 22 lines of retries and 27 s before the error."""
    import time

    env = subprocess_env()
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # closed port, empty cache
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(name, None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sharnn.corpus.prepare", "hf", "owner/name", "--out",
                           str(tmp_path / "c")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), \
        proc.stderr
    assert "cannot reach the Hugging Face Hub" in proc.stderr and "owner/name" in proc.stderr, proc.stderr
    assert took < 20, took
