"""Command line: parse the config and run. A `UserError` becomes one line on stderr with exit status 2; a stop
signal, once its checkpoint is saved, exits with REQUEUE_EXIT_CODE (75) so a job script can requeue the run."""

from __future__ import annotations

import os
import sys

from tuneloop.errors import UserError
from tuneloop.preemption import REQUEUE_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    from tuneloop.config import parse_args
    from tuneloop.loop import Preempted, train

    main_rank = os.environ.get("RANK", "0") == "0"  # every rank reaches the same end; one message is enough
    try:
        train(parse_args(argv))
    except UserError as e:
        if main_rank:
            print(f"tuneloop: error: {e}", file=sys.stderr)
        return 2
    except Preempted as stop:
        if main_rank:
            print(f"tuneloop: {stop}; resume with --resume_from_checkpoint latest (exit {REQUEUE_EXIT_CODE}: requeue)",
                  file=sys.stderr)
        return REQUEUE_EXIT_CODE
    return 0
