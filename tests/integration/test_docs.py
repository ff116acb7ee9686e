"""The README and docs/*.md name only what exists: every command in their shell code blocks (and every
inline code span that starts with a command) uses options that command accepts, checked against its own
`--help` (run once per command); the hyphenated spellings count as the underscore ones. The checks that
need no command (pages found, Python blocks, links, files named): tests/unit/test_docs.py.

Fails listing every problem found, page and line."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass

from tests.helpers import REPO
from tests.unit.test_docs import (
    PAGES,
    all_snippets,
    inline_code,
    shell_commands,
    split_page,
)

OPTION = re.compile(r"--[A-Za-z][\w-]*(?:\.[\w-]+)*")
# Shell scripts whose arguments go to `accelerate launch ... -m train`.
TRAIN_SCRIPTS = {"launch/slurm.sh", "launch/node.sh"}


@dataclass
class Call:
    """One invocation to check: `help_key` names the help text its options are checked against."""
    help_key: tuple[str, ...]
    options: list[str]


def strip_env(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words


def program(word: str) -> str:
    """`sharnn-train` for `.venv/bin/sharnn-train` or `$(BIN)/sharnn-train`; `python` for python3."""
    name = word.rsplit("/", 1)[-1]
    return "python" if re.fullmatch(r"python(3(\.\d+)?)?", name) else name


def options_of(args: list[str]) -> list[str]:
    """The long options among `args`, without values (`--a=b` -> `--a`), up to a `--`."""
    found = []
    for arg in args:
        if arg == "--":
            break
        if OPTION.fullmatch(arg.split("=", 1)[0]):
            found.append(arg.split("=", 1)[0])
    return found


def module_call(module: str, args: list[str]) -> Call:
    if module == "train":
        return Call(("sharnn-train",), options_of(args))
    return Call(("python -m", module), options_of(args))


def calls_of(words: list[str], problems: list[str], where: str) -> list[Call]:
    """What to check in one simple command; `problems` gets what can be told without any --help."""
    words = strip_env(words)
    if not words:
        return []
    prog, args = program(words[0]), words[1:]
    if prog in ("sbatch", "bash", "sh", "srun") and args:
        script = next((a for a in args if not a.startswith("-")), None)
        if script is None:
            return []
        prog, args = script, args[args.index(script) + 1:]
    if prog in TRAIN_SCRIPTS or words[0] in TRAIN_SCRIPTS:
        return [Call(("sharnn-train",), options_of(args))]
    if words[0] == "launch/multinode.sh" or prog == "launch/multinode.sh":
        own, _, train = args, None, []
        if "--" in args:
            own, train = args[:args.index("--")], args[args.index("--") + 1:]
        return [Call(("launch/multinode.sh",), options_of(own)), Call(("sharnn-train",), options_of(train))]
    if prog in console_scripts():
        if prog == "sharnn-prepare":
            sub = next((a for a in args if not a.startswith("-")), None)
            if sub is None or sub.isupper():  # `sharnn-prepare --out`, `... SUBCOMMAND`: any of them
                return [Call((prog, ANY), options_of(args))]
            if sub not in prepare_subcommands():
                problems.append(f"{where}: sharnn-prepare has no subcommand {sub!r} "
                                f"(it has {', '.join(prepare_subcommands())})")
                return []
            return [Call((prog, sub), options_of(args[args.index(sub) + 1:]))]
        return [Call((prog,), options_of(args))]
    if prog == "python" and "-m" in args and args.index("-m") + 1 < len(args):
        i = args.index("-m")
        return [module_call(args[i + 1], args[i + 2:])]
    if prog == "accelerate" and args[:1] == ["launch"]:
        rest = args[1:]
        if "-m" not in rest or rest.index("-m") + 1 >= len(rest):  # `accelerate launch --mixed_precision`
            return [Call(("accelerate launch",), options_of(rest))]
        i = rest.index("-m")
        return [Call(("accelerate launch",), options_of(rest[:i])), module_call(rest[i + 1], rest[i + 2:])]
    if prog == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in make_targets()]
        problems += [f"{where}: make has no target {t!r} (Makefile: {', '.join(sorted(make_targets()))})"
                     for t in missing]
    return []


def repo_paths(words: list[str]) -> list[str]:
    """Words naming files under launch/ or scripts/ (inputs the commands read, never outputs)."""
    return [w for w in words if re.match(r"^(launch|scripts)/[\w./-]+$", w)]


# ---------------------------------------------------------------------------------------- the help texts
@functools.cache
def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> `module:function`."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines if "=" in line)


@functools.cache
def make_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.$()/ -]+?)\s*:(?![=:])", line)
        if m and not line.startswith((".", "\t")):
            targets |= set(m.group(1).split())
    return targets


def command_main(function):
    """The `main` a console entry point runs: sharnn.entry's launchers (functools.partial(run, MODULE)) import
    MODULE and run its main."""
    if isinstance(function, functools.partial):
        return importlib.import_module(function.args[0]).main
    return function


def command_module(name: str):
    """The module whose main the console script `name` runs."""
    module, _, attr = console_scripts()[name].partition(":")
    function = getattr(importlib.import_module(module), attr)
    return importlib.import_module(function.args[0]) if isinstance(function, functools.partial) else \
        importlib.import_module(module)


@functools.cache
def prepare_subcommands() -> tuple[str, ...]:
    """sharnn-prepare's subcommands, from its parser (`build_parser` beside its entry point)."""
    module = command_module("sharnn-prepare")
    parser = module.build_parser()
    found = [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]
    assert found, "sharnn-prepare's parser has no subcommands"
    return tuple(found)


def captured_help(function, argv: list[str], prog: str) -> str:
    """What `function` writes for `argv` (its --help), run in this process; the options of argparse parsers
    made with add_help=False that parse on the way (the trainer's --preset/--config/--dry-run pre-parser,
    whose options its --help does not list) are added as a last line."""
    pre_options: set[str] = set()
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, args=None, namespace=None):
        if not self.add_help:
            pre_options.update(s for s in self._option_string_actions if s.startswith("--"))
        return original(self, args, namespace)

    out = io.StringIO()
    saved_argv, saved_env = sys.argv, dict(os.environ)
    os.environ["COLUMNS"] = "250"  # rich (tyro's help) and argparse wrap at the terminal's width
    sys.argv = [prog, *argv]
    try:
        argparse.ArgumentParser.parse_known_args = recording
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                function(argv) if inspect.signature(function).parameters else function()
            except SystemExit:
                pass
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return out.getvalue() + "\n" + " ".join(sorted(pre_options))


def entry_point(module: str):
    """The function `python -m module` runs: its `main` (or `console_main`), or None."""
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # a package: its __main__
        mod = importlib.import_module(module + ".__main__")
    function = getattr(mod, "console_main", None) or getattr(mod, "main", None)
    return None if function is None else command_main(function)


@functools.cache
def help_text(key: tuple[str, ...]) -> str:
    """The --help output of a command: ("sharnn-eval",), ("sharnn-prepare", "hf"), ("python -m", "bench"),
    ("accelerate launch",), ("launch/multinode.sh",)."""
    if key == ("accelerate launch",):
        from accelerate.commands.launch import launch_command_parser

        parser = launch_command_parser()  # its --help hides options by what sys.argv holds: read the parser
        return " ".join(s for a in parser._actions for s in a.option_strings)
    if key == ("launch/multinode.sh",):
        return subprocess.run(["bash", str(REPO / key[0]), "--help"], capture_output=True, text=True,
                              cwd=REPO).stdout
    if key[0] == "python -m":
        function = entry_point(key[1])
        if function is not None:
            return captured_help(function, ["--help"], f"python -m {key[1]}")
        done = subprocess.run([sys.executable, "-m", key[1], "--help"], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        return done.stdout + done.stderr
    module, _, name = console_scripts()[key[0]].partition(":")
    function = command_main(getattr(importlib.import_module(module), name))
    return captured_help(function, [*key[1:], "--help"], key[0])


def normal(option: str) -> str:
    """`--mem-len` and `--mem_len` alike (the commands accept both)."""
    return "--" + option[2:].replace("-", "_")


ANY = "*"


@functools.cache
def accepted(key: tuple[str, ...]) -> frozenset[str]:
    if key[-1] == ANY:
        return frozenset().union(*(accepted((*key[:-1], sub)) for sub in prepare_subcommands()))
    return frozenset(normal(o) for o in OPTION.findall(help_text(key)))


COMMAND_SPAN = re.compile(r"^([A-Z_][A-Z0-9_]*=\S* )*(\.venv/bin/)?"
                          r"(sharnn-\w+|python3? -m |accelerate launch|make |sbatch |bash launch/|launch/)")


def command_lines() -> list[tuple[str, list[str]]]:
    """(page:line, words) of every simple command in the shell blocks and the inline command spans."""
    found = []
    for snippet in all_snippets():
        if snippet.kind == "shell" or (snippet.kind == "inline" and COMMAND_SPAN.match(snippet.text)):
            found += [(f"{snippet.page.relative_to(REPO)}:{snippet.line + offset}", words)
                      for offset, words in shell_commands(snippet.text)]
    return found


def test_commands_and_options_exist():
    problems, calls = [], []
    for where, words in command_lines():
        problems += [f"{where}: no file {path}" for path in repo_paths(words) if not (REPO / path).exists()]
        calls += [(where, c) for c in calls_of(words, problems, where)]
    checked = set()
    for where, call in calls:
        for option in call.options:
            checked.add(call.help_key)
            if normal(option) not in accepted(call.help_key):
                problems.append(f"{where}: `{' '.join(call.help_key)}` has no option {option} "
                                "(not in its --help)")
    assert not problems, "\n".join(problems)
    # the parsing found what the pages are about (a parse that found nothing would pass trivially)
    assert {("sharnn-train",), ("sharnn-eval",), ("sharnn-generate",), ("accelerate launch",)} <= checked


# Options of other programs that the pages name in prose: the reference's own flags, sbatch's, placeholders.
FOREIGN = {"--accumulate", "--warmup", "--signal", "--requeue", "--cpus_per_task", "--gpus_per_node",
           "--kill_on_bad_exit", "--field", "--model.field", "--model"}  # --model.*: the group


def test_options_named_in_prose_exist():
    """An option in an inline code span anywhere (`--save_every`) is an option of some command, or one of the
    other programs' options listed in FOREIGN."""
    keys = [("sharnn-train",), ("accelerate launch",), ("launch/multinode.sh",), ("sharnn-prepare", ANY)]
    keys += [(name,) for name in console_scripts() if name not in ("sharnn-train", "sharnn-prepare")]
    keys += [("python -m", m) for m in sorted({c.help_key[1] for c in documented_calls()
                                               if c.help_key[0] == "python -m"})]
    known = frozenset().union(*(accepted(k) for k in keys)) | {normal(o) for o in FOREIGN}
    problems = []
    for page in PAGES:
        for n, span in inline_code(split_page(page)[1]):
            problems += [f"{page.relative_to(REPO)}:{n}: no command has the option {o} (`{span}`)"
                         for o in OPTION.findall(span) if normal(o) not in known]
    assert not problems, "\n".join(problems)


def documented_calls() -> list[Call]:
    problems: list[str] = []
    return [c for where, words in command_lines() for c in calls_of(words, problems, where)]


def test_a_bogus_option_is_caught():
    problems: list[str] = []
    calls = calls_of(["sharnn-eval", "runs/x", "--data", "d", "--no_such_option", "1"], problems, "here")
    assert problems == [] and [c.options for c in calls] == [["--data", "--no_such_option"]]
    assert normal("--data") in accepted(calls[0].help_key)
    assert normal("--no_such_option") not in accepted(calls[0].help_key)
    calls_of(["make", "no-such-target"], problems, "here")
    assert problems and "no-such-target" in problems[0]
