"""Interrupted commands (sharnn/io/signals.py): Ctrl-C and SIGTERM end every console command with one line and
exit status 130 / 143, SIGTERM cleans up as Ctrl-C does, and temporaries left by a killed writer are swept
only when their writer is gone."""

from __future__ import annotations

import configparser
import os
import signal
import threading
import time

import pytest

from tests.helpers import REPO


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> "module:function"."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.split("=") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    return {name.strip(): target.strip() for name, target in lines}


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_every_console_command_turns_interrupts_into_one_line(name):
    """Every entry point of setup.cfg is a sharnn.entry launcher: it imports its command with interrupts
    ending the process at once, then runs the command's main under sharnn.io.signals.command (the behaviour
    itself is tested on real commands below)."""
    import functools
    import importlib

    from sharnn import entry

    module, function = console_scripts()[name].split(":")
    launcher = getattr(importlib.import_module(module), function)
    assert isinstance(launcher, functools.partial) and launcher.func is entry.run, \
        f"{name}: {console_scripts()[name]} is not a sharnn.entry launcher"
    main = importlib.import_module(launcher.args[0]).main
    assert hasattr(main, "__wrapped__") or launcher.args[0] == "train.loop", \
        f"{name}: {launcher.args[0]}.main is not decorated with sharnn.io.signals.command"


def test_a_later_handler_is_kept_and_the_previous_one_restored():
    """`command` puts the previous SIGTERM handler back, unless the command installed its own (the trainer's
    StopSignal, or its SIG_IGN at the end, must outlive main)."""
    from sharnn.io.signals import command

    before = signal.getsignal(signal.SIGTERM)

    @command
    def plain() -> int:
        assert signal.getsignal(signal.SIGTERM) is not before
        return 0

    assert plain() == 0 and signal.getsignal(signal.SIGTERM) is before

    @command
    def ignores() -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 0

    try:
        assert ignores() == 0 and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)

    @command
    def terminated() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    assert terminated() == 143 and signal.getsignal(signal.SIGTERM) is before


class _Handled(Exception):
    pass


def test_a_signal_handled_while_read_head_waits_is_acted_on(tmp_path):
    """A signal whose C handler runs while the main thread waits for a quiet FIFO (here: sent to another
    thread, as a SIGTERM just before read() is) must still reach its Python handler within a fraction of a
    second: a bare read() would wait for input (5 s here, for ever with a writer that stays silent)."""
    from sharnn.io.signals import read_head

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def writer():
        fd = os.open(fifo, os.O_WRONLY)  # returns once the reader has opened it
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # handled in this thread's C handler
        time.sleep(5)
        os.close(fd)

    def handler(signum, frame):
        raise _Handled

    previous = signal.signal(signal.SIGUSR1, handler)
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(_Handled):
            read_head(fifo, 100)
        assert time.monotonic() - start < 2
    finally:
        signal.signal(signal.SIGUSR1, previous)
        thread.join()


def test_read_head_reads_only_what_is_asked(tmp_path):
    from sharnn.io.signals import read_head

    path = tmp_path / "text"
    path.write_bytes(b"abcdefgh" * 1000)
    assert read_head(path, 10) == b"abcdefghab"
    assert read_head(path, 10**6) == b"abcdefgh" * 1000
    assert read_head("/dev/zero", 3 << 20, chunk=1 << 20) == bytes(3 << 20)
