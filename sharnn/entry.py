"""The console commands' entry points (setup.cfg): each imports its command (torch, datasets, accelerate:
seconds) with Ctrl-C and SIGTERM ending the process at once with one line (nothing has been written yet, and
an interrupt raised inside an import can be swallowed by the library being imported and come back as another
traceback), then runs it under sharnn.io.signals.command. Standard library only: importing this module (and
the `sharnn` package, whose exports are lazy) takes milliseconds."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys


def run(module: str) -> None:
    """Import `module` and exit with what its `main()` returns."""
    previous = {sig: signal.signal(sig, _exit_at_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    main = importlib.import_module(module).main
    from sharnn.io.signals import command

    asks_help = any(arg in ("-h", "--help") for arg in sys.argv[1:])
    if module != "train.loop" and not asks_help:  # the trainer checks after --cpu_kernels, which replaces it
        from sharnn import kernels

        if problem := kernels.settings_problem():  # an environment variable naming no setting: one line
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sys.exit(f"error: {problem}")

    for sig, handler in previous.items():
        signal.signal(sig, handler)
    sys.exit((main if hasattr(main, "__wrapped__") else command(main))())


def _exit_at_once(signum, frame):
    name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    os.write(2, f"error: interrupted by {name} before the command started\n".encode())
    os._exit(128 + signum)


prepare = functools.partial(run, "sharnn.corpus.prepare")
generate = functools.partial(run, "sharnn.generate")
import_reference = functools.partial(run, "sharnn.convert")
