"""Stop cleanly when asked: finish the optimizer step (or the phase after the last step: final evaluation, best-model
load, final save, predictions), save one checkpoint on every process together, exit 75.

SLURM sends SIGUSR1 (`--signal=USR1@secs`) before a time limit and SIGTERM on preemption; a user presses Ctrl-C. A
signal may reach only some processes (one node, or the launcher forwarding it late), so the handler only records it
and the ranks agree at the end of every optimizer step, all together, whether any of them got one: a rank that
stopped alone would leave the others blocked in their next all-reduce.

torch is imported where it is used: the command line imports this module for `Preempted` before it parses a flag.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later". The SLURM scripts requeue on it.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """A stop signal arrived at optimizer step `step`; `checkpoint_dir` is the newest complete checkpoint."""

    def __init__(self, signal_name: str, checkpoint_dir: str | None, step: int):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint_dir}")
        self.signal_name, self.checkpoint_dir, self.step = signal_name, checkpoint_dir, step


class StopRequest:
    """Records the first stop signal; `agreed()` is the collective check the loop calls once per optimizer step, and
    the job once after each phase that follows the last step.

    Entered before the Accelerator exists (a signal during set-up is recorded, not fatal); `connect` then tells it the
    process count once the process group is up."""

    def __init__(self, num_processes: int = 1, device: torch.device | None = None):
        self.signum = 0
        self._received_at = 0.0
        self._previous = {}
        self._vote = None  # runtime.CpuVote over the processes, once `connect` knows them
        self.connect(num_processes, device)

    def connect(self, num_processes: int, device: torch.device | None) -> None:
        """Agree over `num_processes` from now on (on `device`, None: the CPU). Collective on GPU ranks (it creates a
        gloo group): every rank calls it, once the process group is up."""
        if num_processes > 1:
            from tuneloop.runtime import CpuVote

            self._vote = CpuVote(num_processes, device)

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._received_at = signum, now
            if signum == signal.SIGINT:
                os.write(2, b"\ntuneloop: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to quit now)\n")
        # The launcher forwards the terminal's Ctrl-C to workers that already got it: only a later one counts.
        elif signum == signal.SIGINT and now - self._received_at > 1.0:
            os.write(2, b"\ntuneloop: second Ctrl-C: exiting now without saving\n")
            os._exit(130)

    def agreed(self) -> str | None:
        """Name of the signal any process received, the same answer on every process; None when none did."""
        signum = self._vote.reduce(self.signum, "MAX") if self._vote else self.signum
        return signal.Signals(signum).name if signum else None
