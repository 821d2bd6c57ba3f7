"""The one exception type for problems a user can fix (bad config, data or paths), and argparse's errors as that type.

The CLI prints it as a single line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from typing import NoReturn


class UserError(Exception):
    """A problem with the user's input, phrased as: what is wrong, and how to fix it."""


def is_main_launched_process() -> bool:
    """Whether this is the process that speaks for all (prints, writes shared files) when a launcher started several:
    read from the launcher's RANK, so that it is known before any process group exists (and costs no import)."""
    return os.environ.get("RANK", "0") == "0"


class RankFailed(UserError):
    """Another process failed at a point where all of them agree on success (`runtime.agree`): this one stops too,
    at once, instead of waiting in the next collective until its timeout. The failing process reports the cause."""


class OneLineArgumentErrors:
    """Mixed into an `argparse.ArgumentParser`: an unknown option, an ambiguous prefix or a bad value raises a
    `UserError` naming the closest known options, instead of printing the usage and exiting (or, in
    HfArgumentParser, raising a ValueError with a traceback)."""

    def error(self, message: str) -> NoReturn:
        # HfArgumentParser gives each --option_name a twin --option-name: name the twin only where it was typed.
        message = re.sub(
            r"(/|, )--(\w+(?:-\w+)+)",
            lambda twin: "" if f"--{twin[2].replace('-', '_')}" in message else twin[0],
            message,
        )
        unknown = message.removeprefix("unrecognized arguments: ")
        if unknown != message:
            message = self.describe_unknown(unknown.split())
        elif choice := re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)$", message):
            close = difflib.get_close_matches(choice[1], [c.strip(" '") for c in choice[2].split(",")], n=1)
            message += f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{message}; --help lists every option")

    def describe_unknown(self, tokens: list[str]) -> str:
        known = [
            name
            for action in self._actions
            for name in action.option_strings  # type: ignore[attr-defined]
            if name.startswith("--") and "-" not in name[2:] and action.help != argparse.SUPPRESS
        ]
        options = [t.split("=", 1)[0] for t in tokens if t.startswith("--") or t[:1] == "-" and t[1:2].isalpha()]
        if not options:
            return f"unexpected argument {tokens[0]!r}"
        problems = []
        for option in options:
            close = difflib.get_close_matches(option, known, n=3)
            if not close and len(option) > 3:  # a fragment such as --lr: the options that contain it
                close = [name for name in known if option[2:] in name][:3]
            problems.append(f"unknown option {option}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        return "; ".join(problems)
