"""What a run leaves on disk: checkpoints of the full training state, the fine-tuned model and tokenizer, metrics,
the resolved config.

Model, metric and marker files are written by the main process; for a checkpoint every process writes its own part
(Accelerate's RNG and optimizer shards, its loss sums). Every process takes part in gathering the state dict, which
is what makes the save work when the model is sharded (DeepSpeed ZeRO-3, FSDP).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field

from accelerate import Accelerator

from tuneloop.config import Config
from tuneloop.errors import UserError

RESULTS_FILE = "all_results.json"
CONFIG_FILE = "run_config.json"
HISTORY_FILE = "log_history.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last, by the main process: a checkpoint without it is incomplete
RANK_STATE_FILE = "loop_state_{rank}.json"  # each process's own running sums
PREEMPTED_FILE = "preempted.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where the run is and what it has seen: saved in every checkpoint beside Accelerate's own state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # position of the next micro-batch: epoch, and batches of it already consumed on each process
    batches_in_epoch: int = 0
    train_runtime: float = 0.0  # seconds of training in earlier sessions of this run
    history: list = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    tracker_run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # What a resumed run must match for the data order and the maths to continue unchanged.
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    per_device_train_batch_size: int = 0
    seed: int = 0
    data_seed: int | None = None

    def record_eval(self, value: float, greater_is_better: bool, threshold: float = 0.0) -> bool:
        """Update the best metric; True when this evaluation is the new best."""
        gain = None if self.best_metric is None else (value - self.best_metric) * (1 if greater_is_better else -1)
        if gain is None or gain > threshold:
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.step, 0
            return True
        self.evals_without_improvement += 1
        return False

    def patience_exhausted(self, patience: int | None) -> bool:
        """Early stopping's rule: `patience` evaluations in a row without a new best."""
        return bool(patience) and self.evals_without_improvement >= patience


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR, f"step_{step:07d}")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first. Temporary folders and folders without a state file are ignored."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str, spec: str) -> str | None:
    """`latest` -> the newest complete checkpoint, or None; a path -> that checkpoint, which must be complete."""
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(spec, STATE_FILE)):
        reason = "does not exist" if not os.path.exists(spec) else f"is not a complete checkpoint (no {STATE_FILE})"
        raise UserError(f"resume_from_checkpoint {spec!r} {reason}: pass a folder from "
                        f"{os.path.join(output_dir, CHECKPOINTS_DIR)} or 'latest'")
    return spec


def read_state(path: str) -> TrainerState:
    with open(os.path.join(path, STATE_FILE)) as f:
        return TrainerState(**json.load(f))


def check_resumable(saved: TrainerState, current: TrainerState, path: str) -> None:
    """Refuse to resume into different maths: another world size, batch or accumulation changes the data order."""
    keys = ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed")
    changed = [f"{k} {getattr(saved, k)} -> {getattr(current, k)}" for k in keys if getattr(saved, k) != getattr(current, k)]
    if changed:
        raise UserError(f"checkpoint {path} was written with different settings ({', '.join(changed)}): resume with "
                        "the same process count, batch size, accumulation and seed, or start a new --output_dir")


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: TrainerState, rank_state: dict) -> str:
    """Every process writes its part into a temporary folder; the main process renames it once all are done.

    A kill at any moment leaves either the previous checkpoints untouched plus a `.tmp-` folder that `latest`
    ignores, or one more complete checkpoint.
    """
    final = checkpoint_path(output_dir, state.step)
    tmp = os.path.join(os.path.dirname(final), ".tmp-" + os.path.basename(final))
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a kill mid-write
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        _write_json(os.path.join(tmp, RANK_STATE_FILE.format(rank=accelerator.process_index)), rank_state)
    except OSError as e:
        raise UserError(f"could not write checkpoint {final} ({e.strerror}); earlier checkpoints are intact: free "
                        "space or choose another --output_dir, then resume") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(os.path.join(tmp, STATE_FILE), asdict(state), durable=True)
        if os.path.isdir(final):  # the same step saved twice (a stop right after resuming): same state
            shutil.rmtree(final)
        os.rename(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str) -> dict:
    """Restore Accelerate's state (model, optimizer, scheduler, sampler, RNG of this process); return this process's sums."""
    accelerator.load_state(path)
    with open(os.path.join(path, RANK_STATE_FILE.format(rank=accelerator.process_index))) as f:
        return json.load(f)


def rotate_checkpoints(output_dir: str, keep: int | None, best: str | None) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints, never the best one. Returns what was deleted."""
    if not keep:
        return []
    found = complete_checkpoints(output_dir)
    doomed = [p for p in found[:-keep] if best is None or os.path.abspath(p) != os.path.abspath(best)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def write_preempted(output_dir: str, checkpoint: str, step: int, signal_name: str) -> None:
    """The requeue marker: with several processes `accelerate launch` reports any worker's exit code as 1."""
    _write_json(os.path.join(output_dir, PREEMPTED_FILE), {"checkpoint": checkpoint, "step": step, "signal": signal_name})


def clear_preempted(output_dir: str) -> None:
    """Called when a run starts: a stale marker must never requeue a job that later fails for a real reason."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, PREEMPTED_FILE))


def clean_partial_checkpoints(output_dir: str) -> None:
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def check_free_space(output_dir: str, model, checkpointing: bool, free_bytes: int | None = None) -> None:
    """Fail before training when the disk cannot hold the final model (and, with checkpoints, one more checkpoint)."""
    # DeepSpeed ZeRO-3 creates the model already sharded: numel() is 0 there, ds_numel the full size.
    param_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    # A checkpoint holds the weights and AdamW's two moments; fp32 for both in every set-up tuneloop runs.
    needed = param_bytes * (1 + (3 if checkpointing else 0))
    free = shutil.disk_usage(output_dir).free if free_bytes is None else free_bytes
    if free < needed:
        raise UserError(f"output_dir {output_dir!r} has {free / 2**20:.0f} MiB free, a run of this model needs about "
                        f"{needed / 2**20:.0f} MiB: free space or choose another --output_dir")


def check_writable(output_dir: str) -> None:
    """Fail before training, not after it, when the output folder cannot be written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(f"output_dir {output_dir!r} is not writable ({e.strerror}): pick another --output_dir") from None


def save_final_model(accelerator: Accelerator, model, tokenizer, output_dir: str) -> None:
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective: gathers shards to the main process
    # Under --torch_compile the compiled blocks' keys read `layer.0._orig_mod.…`: plain transformers would load none.
    state_dict = state_dict and {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}
    accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)


def save_results(accelerator: Accelerator, config: Config, results: dict, history: list | None = None) -> None:
    if not accelerator.is_main_process:
        return
    out = config.train.output_dir
    _write_json(os.path.join(out, RESULTS_FILE), results)
    _write_json(os.path.join(out, CONFIG_FILE), config.to_dict())
    if history is not None:
        _write_json(os.path.join(out, HISTORY_FILE), history)


def _write_json(path: str, value, durable: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")
        if durable:  # on disk before the rename that makes the checkpoint count
            f.flush()
            os.fsync(f.fileno())
