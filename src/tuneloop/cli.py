"""Command line: parse the config, run, and turn a `UserError` into one line on stderr with exit status 2."""

from __future__ import annotations

import os
import sys

from tuneloop.errors import UserError


def main(argv: list[str] | None = None) -> int:
    try:
        from tuneloop.config import parse_args
        from tuneloop.loop import train

        train(parse_args(argv))
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank hits the same error; one copy is enough
            print(f"tuneloop: error: {e}", file=sys.stderr)
        return 2
    return 0
