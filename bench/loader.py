"""Benchmark the training data path: prepare random bytes, stream them with StreamLoader, time and measure.

    python -m bench.loader [--size_gb 1.0] [--compare_gb 0.25] [--batch_size 16] [--bptt 1024]
                           [--world_size 1] [--max_seconds 60] [--json PATH] [--dir DIR]

For each corpus size (``--size_gb`` and, for comparison, ``--compare_gb``) this writes random bytes, prepares
them with ``sharnn.corpus.prepare.prepare_files`` (the code behind ``sharnn-prepare files``), then runs every
rank of
a ``--world_size`` layout as its own fresh process (all at once, as real ranks would) that streams one epoch
of the train split (or ``--max_seconds``). Each is measured twice: "cold", after evicting the corpus files
from the page cache (``posix_fadvise(DONTNEED)``, only these files), and "warm", with the files cached.
Reported per rank: bytes of inputs delivered per second, and memory from ``/proc/self/status``: RSS (what
psutil reports) split into RssAnon (private memory: must not depend on the corpus size) and RssFile (mapped
corpus pages that were touched; page cache shared with other ranks, dropped by the kernel under memory
pressure).

The generated corpora are removed at the end unless ``--dir`` is given (then they are kept and reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import check_output
from sharnn import cli
from sharnn.io import atomic

GIB = 2**30
MIB = 2**20
HELD_OUT_BYTES = 4 * MIB  # valid and test each; the train split is nearly the whole corpus


def _proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _memory() -> dict[str, int]:
    import psutil

    status = _proc_status()
    return {"rss": psutil.Process().memory_info().rss, "anon": status["RssAnon"], "file": status["RssFile"],
            "peak_rss": status["VmHWM"]}


def _evict(corpus: Path) -> None:
    """Drop the corpus files' pages from the page cache (affects only these files)."""
    for path in corpus.rglob("*.arrow"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(corpus: Path, batch_size: int, bptt: int, rank: int, world_size: int, max_seconds: float) -> dict:
    """One rank: open the train split, stream until the epoch ends or time is up. Run in a fresh process."""
    import torch  # noqa: F401  (imported before the baseline so its memory is not counted as growth)

    from sharnn.corpus.data import StreamLoader, open_split

    start = _memory()
    t0 = time.perf_counter()
    split = open_split(corpus, "train")
    open_s = time.perf_counter() - t0
    opened = _memory()
    loader = StreamLoader(split, batch_size, bptt, rank, world_size, seed=0)
    n_bytes = n_steps = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while loader.epoch == 0 and time.perf_counter() - t0 < max_seconds:
        batch = next(loader)
        n_bytes += batch.inputs.numel()
        n_steps += 1
    elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    end = _memory()
    return {"rank": rank, "split_bytes": len(split), "open_s": open_s, "steps": n_steps,
            "input_bytes": n_bytes, "seconds": elapsed, "bytes_per_s": n_bytes / elapsed,
            "cpu_seconds": cpu_s, "bytes_per_cpu_s": n_bytes / cpu_s,
            "whole_epoch": loader.epoch > 0,
            "rank_stream_bytes": batch_size * (len(split) // (batch_size * world_size)),
            "memory_start": start, "memory_open": opened, "memory_end": end,
            "anon_growth": end["anon"] - start["anon"], "file_growth": end["file"] - start["file"],
            "rss_growth": end["rss"] - start["rss"]}


def _run_ranks(corpus: Path, args: argparse.Namespace) -> list[dict]:
    """All ranks at once, each in a fresh interpreter, so each one's memory baseline is clean."""
    def command(rank: int) -> list[str]:
        return [sys.executable, "-m", "bench.loader", "--_measure", str(corpus), "--_rank", str(rank),
                "--batch_size", str(args.batch_size), "--bptt", str(args.bptt),
                "--world_size", str(args.world_size), "--max_seconds", str(args.max_seconds)]

    procs = [subprocess.Popen(command(r), stdout=subprocess.PIPE, text=True) for r in range(args.world_size)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"error: benchmark worker failed with exit code {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _make_corpus(root: Path, n_bytes: int) -> tuple[Path, dict]:
    """Prepare (or reuse) a corpus of ``n_bytes`` random bytes under ``root``; returns it and some timings."""
    import numpy as np

    from sharnn.corpus.data import CorpusError, read_manifest
    from sharnn.corpus.prepare import prepare_files

    corpus = root / f"random-{n_bytes}"
    try:
        if read_manifest(corpus)["total_bytes"] == n_bytes:
            return corpus, {"reused": True}
    except (CorpusError, KeyError):
        pass
    raw = root / f"random-{n_bytes}.bin"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with open(raw, "wb") as f:
        for pos in range(0, n_bytes, 64 * MIB):
            f.write(rng.bytes(min(64 * MIB, n_bytes - pos)))
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare_files([raw], corpus, valid_bytes=HELD_OUT_BYTES, test_bytes=HELD_OUT_BYTES, overwrite=True)
    prepare_s = time.perf_counter() - t0
    raw.unlink()
    return corpus, {"reused": False, "generate_s": generate_s, "prepare_s": prepare_s,
                    "prepare_bytes_per_s": n_bytes / prepare_s}


def _table(rows: list[dict]) -> str:
    head = ("corpus", "cache", "rank", "MB/s", "MB/CPU-s", "steps", "epoch", "RSS start", "RSS end", "anon +",
            "file +", "open ms")
    lines = [head]
    for row in rows:
        r = row["result"]
        lines.append((f"{row['corpus_bytes'] / GIB:.2f} GiB", row["cache"], str(r["rank"]),
                      f"{r['bytes_per_s'] / 1e6:.0f}", f"{r['bytes_per_cpu_s'] / 1e6:.0f}", str(r["steps"]),
                      "whole" if r["whole_epoch"] else "part",
                      f"{r['memory_start']['rss'] / MIB:.0f} MiB", f"{r['memory_end']['rss'] / MIB:.0f} MiB",
                      f"{r['anon_growth'] / MIB:+.1f} MiB", f"{r['file_growth'] / MIB:+.0f} MiB",
                      f"{r['open_s'] * 1e3:.0f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0])
    parser.add_argument(*cli.spellings("--size_gb"), type=float, default=1.0,
                        help="corpus size in GiB (default 1.0)")
    parser.add_argument(*cli.spellings("--compare_gb"), type=float, default=0.25,
                        help="second, smaller corpus for the memory comparison in GiB (0 to skip; "
                             "default 0.25)")
    parser.add_argument(*cli.spellings("--batch_size"), type=int, default=16,
                        help="streams per rank (default 16)")
    parser.add_argument("--bptt", type=int, default=1024, help="base segment length (default 1024)")
    parser.add_argument(*cli.spellings("--world_size"), type=int, default=1,
                        help="ranks, each a process (default 1)")
    parser.add_argument(*cli.spellings("--max_seconds"), type=float, default=60.0,
                        help="stop a rank after this long if its epoch has not ended (default 60)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--dir", type=Path, default=None, help="keep (and reuse) the corpora here")
    parser.add_argument("--_measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_output(args.json, "--json", atomic.json_with_keys("args", "machine", "prepared", "runs"),
                 "record of python -m bench.loader")

    if args._measure is not None:  # worker process
        print(json.dumps(measure(args._measure, args.batch_size, args.bptt, args._rank, args.world_size,
                                 args.max_seconds)))
        return 0

    sizes = [int(args.size_gb * GIB)] + ([int(args.compare_gb * GIB)] if args.compare_gb > 0 else [])
    keep = args.dir is not None
    root = args.dir if keep else Path(tempfile.mkdtemp(prefix="sharnn-bench-loader-"))
    root.mkdir(parents=True, exist_ok=True)
    rows, prepared = [], {}
    try:
        for n_bytes in sizes:
            corpus, stats = _make_corpus(root, n_bytes)
            prepared[n_bytes] = stats
            if not stats["reused"]:
                print(f"prepared {n_bytes / GIB:.2f} GiB in {stats['prepare_s']:.1f} s "
                      f"({stats['prepare_bytes_per_s'] / 1e6:.0f} MB/s)", file=sys.stderr)
            for cache in ("cold", "warm"):
                if cache == "cold":
                    _evict(corpus)
                for result in _run_ranks(corpus, args):
                    rows.append({"corpus_bytes": n_bytes, "cache": cache, "result": result})
    finally:
        if not keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)

    print(f"StreamLoader: batch {args.batch_size} x bptt {args.bptt} (varied), world size {args.world_size}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; MB/s = bytes of inputs delivered "
          f"per second per rank (MB/CPU-s: per second of the rank's own CPU time)")
    print(_table(rows))
    if args.json:
        import numpy
        import torch

        report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if not k.startswith("_")},
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "numpy": numpy.__version__, "torch": torch.__version__,
                              "platform": platform.platform()},
                  "prepared": {str(k): v for k, v in prepared.items()}, "runs": rows}
        atomic.write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
