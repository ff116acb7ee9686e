"""`accelerate launch -m train --preset tiny --data CORPUS --out RUN_DIR`, or `python -m train ...`."""

import os
import signal
import sys


def console_main() -> None:
    """`sharnn-train`. While the heavy imports run (seconds), Ctrl-C or SIGTERM ends the process at once with
    one line: nothing has been written yet, and an exception raised inside an import can be swallowed by the
    library being imported and come back as another traceback (measured: numpy half-imported under torch).
    From then on sharnn.io.signals.command handles them."""
    previous = {sig: signal.signal(sig, _exit_at_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    from sharnn.io.signals import command  # the sharnn package: torch
    from train.loop import main  # accelerate, DeepSpeed

    for sig, handler in previous.items():
        signal.signal(sig, handler)
    sys.exit(command(main)())


def _exit_at_once(signum, frame):
    name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    os.write(2, f"error: interrupted by {name} before the command started\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    console_main()
