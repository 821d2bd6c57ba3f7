"""Elastic resume: a checkpoint written by N processes continued on M, with the same global batch.

The layout maths choose this session's layout before anything is built (`resume_state`); `load_checkpoint` then
brings the saved state into it: Accelerate's micro-step counter, the schedule's position, a new rank's RNG, the old
ranks' loss sums merged, and under DeepSpeed ZeRO the optimizer state through DeepSpeed's universal checkpoint. Every
load goes through it, the best model's at the end too: a checkpoint from before an elastic resume has another layout.
What a checkpoint holds, where it is and how it is written are checkpoint.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.constants import RNG_STATE_NAME

from tuneloop import checkpoint, runtime
from tuneloop.errors import UserError
from tuneloop.options import TrainArguments


# With Accelerate's sharding (split_batches=False, even batches) the loader cuts the epoch's one seeded order into
# batches of the per-device size B and deals batch i to rank i % N; accumulation A then makes optimizer step k consume
# global batches [k*N*A, (k+1)*N*A), i.e. samples [k*G, (k+1)*G) with G = B*N*A. Keeping G keeps every step's samples,
# the averaged gradient and the schedule.
@dataclass(frozen=True)
class Layout:
    processes: int
    per_device_batch: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return TrainArguments.global_batch(self.processes, self.per_device_batch, self.accumulation)

    def __str__(self) -> str:
        return f"{self.processes} processes x batch {self.per_device_batch} x accumulation {self.accumulation}"


def layout_of(state: checkpoint.TrainerState) -> Layout:
    return Layout(state.num_processes, state.per_device_train_batch_size, state.gradient_accumulation_steps)


def keep_global_batch(global_batch: int, processes: int, preferred_batch: int) -> Layout | None:
    """The layout of `processes` with `global_batch` examples per step: the preferred per-device batch when it divides
    the share of one process (only the accumulation changes), else the largest batch below it that does; None when the
    global batch cannot be split evenly over `processes`."""
    if global_batch % processes:
        return None
    share = global_batch // processes
    batch = max(b for b in range(1, min(preferred_batch, share) + 1) if share % b == 0)
    return Layout(processes, batch, share // batch)


def resume_state(
    saved: checkpoint.TrainerState, current: checkpoint.TrainerState, path: str, elastic: bool
) -> checkpoint.TrainerState:
    """The saved state to continue from, converted to this session's process count when it differs (elastic).

    `current` holds this session's layout as configured; the returned state holds the layout it will train with.
    Refuses what cannot continue the same run: a changed seed, a changed batch on the same process count, a global
    batch this process count cannot keep. (DeepSpeed ZeRO state of another count is converted later, once the
    Accelerator exists: `universal_checkpoint`.)
    """
    if saved.num_processes == current.num_processes or not elastic:
        checkpoint.check_resumable(saved, current, path)
        return saved
    if saved.settings.get("streaming"):
        # Each rank saved its place in its own part of the stream (stream.StreamLoader.position); another process
        # count splits the stream into other parts (other shards or every other row), and with dropped bad rows or
        # shards of unequal sizes no place in them continues the same order of samples.
        raise UserError(
            f"checkpoint {path} was written by {saved.num_processes} processes each reading its own part of a "
            f"training stream, which {current.num_processes} processes cannot continue exactly: resume on "
            f"{saved.num_processes} processes (or start a new --output_dir)"
        )
    checkpoint.check_resumable(saved, current, path, keys=("seed", "data_seed", "max_tokens_per_batch"))
    if saved.max_tokens_per_batch:
        # Token-budget batches hold varying numbers of samples, dealt whole to the ranks in turn: no layout of another
        # process count gives the same samples per step.
        raise UserError(
            f"checkpoint {path} was written by {saved.num_processes} processes with "
            f"--max_tokens_per_batch {saved.max_tokens_per_batch}, whose batches another process count "
            f"cannot keep: resume on {saved.num_processes} processes (or start a new --output_dir)"
        )
    before = layout_of(saved)
    global_batch = before.global_batch
    after = keep_global_batch(global_batch, current.num_processes, current.per_device_train_batch_size)
    if after is None:
        working = [
            keep_global_batch(global_batch, n, current.per_device_train_batch_size)
            for n in range(1, global_batch + 1)
            if global_batch % n == 0
        ]
        raise UserError(
            f"checkpoint {path} was written by {before} (global batch {global_batch}), which "
            f"{current.num_processes} processes cannot keep: resume on "
            + "; ".join(str(layout) for layout in working[:8])
            + " (or start a new --output_dir)"
        )
    # The position in the epoch, saved in this rank's micro-batches of the old layout, becomes global samples and
    # then micro-batches of the new one (exact at an optimizer step; at the epoch's end it covers the whole epoch).
    samples = saved.batches_in_epoch * before.processes * before.per_device_batch
    per_micro_step = after.processes * after.per_device_batch
    return checkpoint.TrainerState(
        **{
            **asdict(saved),
            "num_processes": after.processes,
            "per_device_train_batch_size": after.per_device_batch,
            "gradient_accumulation_steps": after.accumulation,
            "batches_in_epoch": -(-samples // per_micro_step),
            "length_group_batch_size": saved.length_group_batch_size or before.per_device_batch,
        }
    )


def load_checkpoint(
    accelerator: Accelerator, path: str, scheduler=None, micro_step: int = 0, trained_only: bool = False
) -> dict:
    """Restore Accelerate's state (model, optimizer, scheduler, sampler, RNG of this process); return this process's
    loss sums.

    A checkpoint of another process count (elastic resume) is converted after loading: Accelerate's micro-step
    counter (to `micro_step`, this epoch's micro-batches in the new layout), the scheduler's position, a new rank's
    RNG, and the loss sums of all old ranks merged and shared out evenly. Under DeepSpeed it loads from its universal
    conversion (`universal_checkpoint`, made on first use)."""
    saved_processes = checkpoint.read_state(path).num_processes
    rank, processes = accelerator.process_index, accelerator.num_processes
    load_from = path
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if saved_processes != processes:
            load_from = universal_checkpoint(accelerator, path)
        _load_universal(accelerator, saved_processes != processes)
    weights = checkpoint.trained_weights_only(accelerator, saving=False) if trained_only else {}
    accelerator.load_state(load_from, **weights)
    if saved_processes == processes:
        with open(os.path.join(path, checkpoint.RANK_STATE_FILE.format(rank=rank))) as f:
            return json.load(f)
    # load_state brings back the old layout's count of micro-batches since the epoch began; Accelerate steps the
    # optimizer when it reaches a multiple of the accumulation, so an odd count under accumulation 2 would step
    # after every odd micro-batch.
    accelerator.step = micro_step
    if scheduler is not None:
        rescale_schedule(scheduler, saved_processes, processes)
    if rank >= saved_processes:  # Accelerate found no RNG file of this rank and only logged it
        _load_rng_states(os.path.join(path, f"{RNG_STATE_NAME}_{rank % saved_processes}.pkl"))
    return merged_rank_state(path, saved_processes, processes)


UNIVERSAL_DONE = "universal.json"  # written last, just before the rename that makes the conversion count


def universal_checkpoint(accelerator: Accelerator, path: str) -> str:
    """DeepSpeed ZeRO saves its optimizer state partitioned by rank; another process count loads it only as a
    universal checkpoint. Converted once, by the main process, with DeepSpeed's own tool, into a sibling folder that
    links the checkpoint's other files. Returns the folder to load from; every process calls it.

    Converted into a `.tmp-` folder that is renamed when complete (a kill leaves a `.tmp-` folder, which the next run
    deletes, never a half conversion taken as done); a conversion that fails (any non-zero exit: an OOM kill leaves
    no message) stops every process with one line naming the exit status."""
    root, name = os.path.split(path)
    universal = os.path.join(root, checkpoint.UNIVERSAL_PREFIX + name)
    error = None
    if accelerator.is_main_process and not os.path.isfile(os.path.join(universal, UNIVERSAL_DONE)):
        try:
            _convert_to_universal(path, universal)
        except UserError as e:
            error = e
    runtime.agree(accelerator, error, f"converting {path} to a universal checkpoint")
    return universal


def _convert_to_universal(path: str, universal: str) -> None:
    import signal
    import subprocess
    import sys

    tmp = os.path.join(os.path.dirname(universal), ".tmp-" + os.path.basename(universal).lstrip("."))
    model_dir = "pytorch_model"  # Accelerate's DeepSpeed tag for the (first) model
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        os.path.join(path, model_dir),
        "--output_folder",
        os.path.join(tmp, model_dir),
        "--inject_missing_state",
    ]  # what Megatron-DeepSpeed records itself; a transformers model has none
    shutil.rmtree(universal, ignore_errors=True)  # one without its UNIVERSAL_DONE: an older version's, unfinished
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        code = done.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        how += " (out of memory?)" if code == -signal.SIGKILL else ""
        last = done.stderr.strip().splitlines()[-1:]
        raise UserError(
            f"could not convert the DeepSpeed checkpoint {path} for another process count (`"
            f"{' '.join(command)}` failed, {how}{': ' + last[0] if last else ''}): resume on "
            f"{checkpoint.read_state(path).num_processes} processes"
        )
    for name in os.listdir(path):  # scheduler, RNG, sampler, loss sums, state: linked
        if name not in (model_dir, "latest", checkpoint.MANIFEST_FILE):
            os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(tmp, name))
    checkpoint.write_json(
        os.path.join(tmp, UNIVERSAL_DONE), {"source": os.path.abspath(path), "command": command}, durable=True
    )
    os.rename(tmp, universal)


def _load_universal(accelerator: Accelerator, universal: bool) -> None:
    """DeepSpeed reads `checkpoint.load_universal` from each engine's parsed config at every load
    (`DeepSpeedEngine.load_universal_checkpoint()`), not from the config dict after `prepare`: set it for this load,
    so that a normal checkpoint loaded later (--load_best_model_at_end after an elastic resume) loads as one."""
    for model in accelerator._models:  # what `load_state` loads: the prepared DeepSpeed engine(s)
        if hasattr(model, "_config"):
            model._config.load_universal_checkpoint = universal


def rescale_schedule(scheduler, saved_processes: int, processes: int) -> None:
    """Accelerate's prepared scheduler steps the wrapped one once per process per optimizer step (and the schedule was
    sized that way, see config.make_scheduler): its count scales with the process count. Move it to the same optimizer
    step of the new count and set the learning rate that step has."""
    inner = getattr(scheduler, "scheduler", scheduler)
    if not hasattr(inner, "last_epoch"):
        return
    position = inner.last_epoch * processes // saved_processes
    inner.last_epoch, inner._step_count = position - 1, position
    inner.step()  # recomputes the learning rate of `position` from the schedule (LambdaLR: closed form)


def merged_rank_state(path: str, saved_processes: int, processes: int) -> dict:
    """The loss sums of all saved ranks, shared out evenly over `processes`: the run's loss is the mean over ranks of
    each rank's sum / count, which with equal shares is the mean over every micro-batch, as before."""
    parts = []
    for rank in range(saved_processes):
        with open(os.path.join(path, checkpoint.RANK_STATE_FILE.format(rank=rank))) as f:
            parts.append(json.load(f))
    shared = {
        key: sum(p[key] for p in parts) / processes
        for key in ("window_loss", "window_count", "total_loss", "total_count")
    }
    return {**shared, **{key: max(p[key] for p in parts) for key in ("nonfinite_streak", "skipped_steps")}}


def _load_rng_states(file: str) -> None:
    """What `Accelerator.load_state` does with this process's RNG file, for a rank the checkpoint had no file for:
    such a rank continues from the streams of rank (rank mod saved processes). Read as Accelerate reads it: a
    weights-only load (tensors, numpy's state arrays and dtypes; no other pickled object can run code)."""
    import pickle
    import random

    import numpy as np
    import torch
    from accelerate.utils import load

    try:
        states = load(file)  # torch.load(weights_only=True), numpy's array types allowed
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = (
            f"it pickles {found[1]}, which only a full unpickling could load"
            if found
            else " ".join(str(e).split())[:200]
        )
        raise UserError(
            f"{file} is not an RNG state file that a weights-only load accepts ({what}): resume only from "
            "checkpoints you trust"
        ) from None
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
