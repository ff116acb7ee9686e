"""What the command lines share: one spelling per option, old spellings as aliases, checked argument types.

Options are spelled with underscores, as the trainer's (`sharnn-train --batch_size --model.mem_len`):
`sharnn-eval --mem_len`, `sharnn-generate --top_k`. The hyphenated spellings the commands had first
(`--mem-len`) keep working:

    parser = cli.ArgumentParser(prog="sharnn-eval")
    parser.add_argument(*cli.spellings("--bptt", "--seg_len"), type=cli.positive_int)
    # accepts --bptt, --seg_len and --seg-len; --help and usage show --bptt only

Messages about an option name the spelling that was typed (`argument --mem-len: must be >= 1, got 0`).
"""

from __future__ import annotations

import argparse
import copy


def spellings(canonical: str, *old: str) -> tuple[str, ...]:
    """Option strings for `add_argument`: `canonical` first (it names the attribute and is what --help
    shows), then the `old` names, each also with hyphens for underscores."""
    names = [canonical]
    for name in (canonical, *old):
        for spelling in (name, "--" + name[2:].replace("_", "-")):
            if spelling not in names:
                names.append(spelling)
    return tuple(names)


def _aliases(action: argparse.Action) -> list[str]:
    """The long option strings of `action` after its first (canonical) one."""
    return [s for s in action.option_strings if s.startswith("--")][1:]


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option under its canonical (first long) spelling only, plus any short one (-h, --help)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if _aliases(action):
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in _aliases(action)]
        return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `HelpFormatter`, a note on the other spellings at the end of --help, and errors that name
    an option by the spelling used on the command line (argparse would name all of them: --mem_len/--mem-len).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        with_aliases = [a for a in self._actions if _aliases(a)]
        if not with_aliases:
            return super().format_help()
        parts = []
        hyphenated = [a.option_strings[0] for a in with_aliases if "_" in a.option_strings[0]]
        if hyphenated:
            parts.append(f"Options are also accepted with hyphens for underscores "
                         f"({hyphenated[0].replace('_', '-')} for {hyphenated[0]})")
        for a in with_aliases:
            renamed = [s for s in _aliases(a) if s != a.option_strings[0].replace("_", "-")]
            if renamed:
                parts.append(f"{a.option_strings[0]} also as {' or '.join(renamed)}")
        note = "; ".join(parts) + "."
        saved = self.epilog
        self.epilog = f"{saved} {note}" if saved else note
        try:
            return super().format_help()
        finally:
            self.epilog = saved

    def _get_option_tuples(self, option_string):
        # An abbreviation (--mem) matching several spellings of one option is not ambiguous.
        tuples, actions = [], set()
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in actions:
                actions.add(id(t[0]))
                tuples.append(t)
        return tuples

    def _parse_known_args(self, arg_strings, *args, **kwargs):
        try:
            return super()._parse_known_args(arg_strings, *args, **kwargs)
        except argparse.ArgumentError as e:
            typed = {}
            for arg in arg_strings:
                if arg == "--":
                    break
                action = self._option_string_actions.get(arg.split("=", 1)[0])
                if action is not None:
                    typed.setdefault("/".join(action.option_strings), arg.split("=", 1)[0])
            by_name = {"/".join(a.option_strings): a for a in self._actions if a.option_strings}
            if e.argument_name in by_name:
                e.argument_name = typed.get(e.argument_name, by_name[e.argument_name].option_strings[0])
            raise


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, with a message that says what was wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(kind):
    """argparse type: a number of type `kind` (int, float) >= 0."""
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def checked(parse):
    """argparse type from a function that raises ValueError with a message that says what was wrong (argparse
    prints only "invalid value" for a plain ValueError)."""
    def parse_or_explain(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse_or_explain.__name__ = parse.__name__
    return parse_or_explain


def probability(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
