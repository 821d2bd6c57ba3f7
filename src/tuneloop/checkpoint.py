"""Checkpoints of the full training state: what they hold (`TrainerState`, each process's loss sums), where they are
and which are whole, what a resume must keep, and how every file of a run is written.

For a checkpoint every process writes its own part (Accelerate's RNG and optimizer shards, its loss sums); the state
and the markers are written by the main process. A checkpoint counts once its folder has its final name; before the
rename every file is on disk (fsynced by the process that wrote it) and listed with its size in a manifest, so a
checkpoint torn by a machine crash is recognised and skipped. Every write of a run goes through `writing`: a full
disk stops the run with one line.

Loading a checkpoint, whatever layout of processes wrote it, is elastic.py's; the final model, the results and the
output folder's checks are outputs.py's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field

from accelerate import Accelerator
from accelerate.utils import DistributedType

from tuneloop import runtime
from tuneloop.errors import UserError
from tuneloop.options import Config
from tuneloop.problem import LOSS_OPTIONS

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last, by the main process: a checkpoint without it is incomplete
RANK_STATE_FILE = "loop_state_{rank}.json"  # each process's own running sums (and its place in a training stream)
PREEMPTED_FILE = "preempted.json"
MANIFEST_FILE = "manifest.json"  # every other file of the checkpoint and its size, written just before the rename
# elastic.py's DeepSpeed universal conversions, beside the checkpoints: `latest` never sees one, rotation deletes
# each with its source.
UNIVERSAL_PREFIX = ".universal-"
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
    # The run's identity: the same in every checkpoint of one run, whatever the sessions; output_dir/run.json names the
    # run that owns the folder, and `latest` resumes only its checkpoints (outputs.py). Trackers continue this run id.
    tracker_run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # What a resumed run must not change, beyond the layout below: resume_settings(), data_settings().
    settings: dict = field(default_factory=dict)
    # What a resumed run must match for the data order and the maths to continue unchanged.
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    per_device_train_batch_size: int = 0
    seed: int = 0
    data_seed: int | None = None
    # The batch the length-grouped sampler groups by: the first session's per-device batch, kept when an elastic
    # resume has to change the per-device batch, so that the order of the samples does not change with it.
    length_group_batch_size: int = 0
    max_tokens_per_batch: int = 0  # the token budget of the batches (0: batches of per_device_train_batch_size)

    def record_eval(self, value: float, greater_is_better: bool, threshold: float = 0.0) -> bool:
        """Update the best metric; True when this evaluation is the new best. A NaN/inf never is (a NaN best would
        make every later comparison false): it counts as an evaluation without improvement."""
        if not math.isfinite(value):
            self.evals_without_improvement += 1
            return False
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


def saved_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders with their state file, oldest first; temporary folders are ignored. Not yet verified."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first: saved, and every file as long as its manifest says."""
    return [path for path in saved_checkpoints(output_dir) if torn(path) is None]


def torn(path: str) -> str | None:
    """What a checkpoint's manifest finds missing or cut short, or None when it is whole. A checkpoint written before
    manifests existed has none, and counts as whole. A folder deleted while it is read (rotation) is not whole."""
    try:
        with open(os.path.join(path, MANIFEST_FILE)) as f:
            sizes = json.load(f)
    except FileNotFoundError:
        return None if os.path.isfile(os.path.join(path, STATE_FILE)) else f"its {STATE_FILE} is gone"
    except (OSError, ValueError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, size in sizes.items():
        try:
            found = os.path.getsize(os.path.join(path, name))
        except OSError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} of its {size} bytes"
    return None


def find_checkpoint(output_dir: str, spec: str, report=print, run_id: str | None = None) -> str | None:
    """`latest` -> the newest complete checkpoint (of run `run_id` only, when given), or None, passing over (and
    `report`ing) torn ones; a path -> that checkpoint, which must be complete."""
    if spec == "latest":
        for path in reversed(saved_checkpoints(output_dir)):
            if run_id is not None and read_state(path).tracker_run_id != run_id:
                continue  # another run's (outputs.choose_run refuses a folder holding one)
            if (problem := torn(path)) is None:
                return path
            report(f"tuneloop: skipping torn checkpoint {path}: {problem} (a crash while it was written?)")
        return None
    if not os.path.isfile(os.path.join(spec, STATE_FILE)):
        reason = "does not exist" if not os.path.exists(spec) else f"is not a complete checkpoint (no {STATE_FILE})"
        raise UserError(
            f"resume_from_checkpoint {spec!r} {reason}: pass a folder from "
            f"{os.path.join(output_dir, CHECKPOINTS_DIR)} or 'latest'"
        )
    if problem := torn(spec):
        raise UserError(f"resume_from_checkpoint {spec!r} is torn ({problem}): pass an earlier checkpoint or 'latest'")
    return os.path.normpath(spec)  # `step_N/` would put what is made beside it (.universal-step_N) inside it


def read_state(path: str) -> TrainerState:
    with open(os.path.join(path, STATE_FILE)) as f:
        return TrainerState(**json.load(f))


def check_resumable(
    saved: TrainerState,
    current: TrainerState,
    path: str,
    keys: tuple[str, ...] = (
        "num_processes",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "seed",
        "data_seed",
        "max_tokens_per_batch",
    ),
) -> None:
    """Refuse to resume into different maths: another world size, batch or accumulation changes the data order."""
    changed = [
        f"{k} {getattr(saved, k)} -> {getattr(current, k)}" for k in keys if getattr(saved, k) != getattr(current, k)
    ]
    if changed:
        raise UserError(
            f"checkpoint {path} was written with different settings ({', '.join(changed)}): resume with "
            "the same process count, batch size (or token budget), accumulation and seed, or start a new "
            "--output_dir"
        )


# What a resumed run must keep, besides the layout and seeds (check_resumable): the model, what it trains on, and the
# maths of every step. Everything else may change on resume: how long (max_steps, num_train_epochs), logging,
# evaluation (when, which sets, which metrics are reported), checkpointing, predictions, merge_adapter, precision and
# engine, and the process count (elastic resume). The optimizer's hyperparameters are in the list because loading
# its state brings back the saved ones: a changed --learning_rate would be ignored without a word.
RESUME_SETTINGS = {
    "model": (
        "model_name_or_path",
        "dtype",
        "attention_dropout",
        "use_peft",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ),
    # (a stream's order also follows its shuffle buffer)
    "data": ("max_length", "train_sampling_strategy", "length_grouping_window", "streaming", "shuffle_buffer_size"),
    "train": (
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        *LOSS_OPTIONS,
        "metric_for_best_model",
        "greater_is_better",
    ),
}


def resume_settings(config: Config) -> dict:
    """The settings of RESUME_SETTINGS, as a checkpoint records them: known before anything is loaded."""
    sections = {"model": config.model, "data": config.data, "train": config.train}
    settings = {key: getattr(sections[section], key) for section, keys in RESUME_SETTINGS.items() for key in keys}
    model = os.path.expanduser(config.model.model_name_or_path)
    if os.path.isdir(model):  # the same folder, whichever way it is named (and wherever the job starts)
        settings["model_name_or_path"] = os.path.abspath(model)
    if config.train.max_tokens_per_batch:  # which texts share a batch then depends on the padded lengths
        settings["pad_to_multiple_of"] = config.data.pad_to_multiple_of
    return json.loads(json.dumps(settings, default=str))  # as read back from trainer_state.json


def data_settings(splits, problem_type: str) -> dict:
    """What the run trains on, known once the data is loaded (`data.Splits`): the labels, the problem type, and the
    training examples themselves: their count and a hash of the text and label columns' values in order. A hash of the
    content, not of paths or file times: a copied or moved file resumes, a changed one (or another subset, split, text
    or label column) does not. A few seconds per million short texts."""
    import hashlib

    columns = [c for c in (splits.text_column, splits.text_pair_column, splits.label_column) if c]
    digest = hashlib.sha256()
    for batch in splits.train.select_columns(columns).with_format("arrow").iter(batch_size=10_000):
        digest.update(json.dumps(batch.to_pydict(), ensure_ascii=False, default=str).encode())
    # A stream's training split is a peek at its first rows (stream.load_splits): those are what is hashed.
    examples = (
        f"{len(splits.train)} examples" if splits.stream is None else f"a stream, its first {len(splits.train)} rows"
    )
    return {
        "labels": list(splits.label_names),
        "problem_type": problem_type,
        "training data": f"{examples}, sha256 {digest.hexdigest()[:16]}",
    }


def check_settings(saved: TrainerState, current: dict, path: str) -> None:
    """Refuse to resume with another value of a recorded setting, naming each (old -> new). A checkpoint written
    before settings were recorded, or a setting it lacks, is not compared."""

    def shown(value) -> str:
        text = repr(value) if not isinstance(value, str) else value
        return text if len(text) <= 80 else text[:77] + "..."

    changed = [
        f"{key} {shown(saved.settings[key])} -> {shown(value)}"
        for key, value in current.items()
        if key in saved.settings and saved.settings[key] != value
    ]
    if changed:
        raise UserError(
            f"checkpoint {path} was written with other settings ({'; '.join(changed)}): resume with the "
            "settings it was written with, or start a new run (another --output_dir, or "
            "--overwrite_output_dir without --resume_from_checkpoint)"
        )


def trained_weights_only(accelerator: Accelerator, saving: bool) -> dict:
    """`save_state` / `load_state` arguments that keep a checkpoint to the weights that train (with LoRA: the adapter
    and the head; the frozen base is in the model folder already). DeepSpeed filters them itself; elsewhere
    `keep_trained_weights` (registered when LoRA is on) drops the rest, and loading must then not expect them."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}
    return {} if saving else {"strict": False}


def keep_trained_weights(models: list, weights: list[dict], output_dir: str) -> None:
    """Accelerate's save_state pre-hook: each model's state dict cut down to its parameters that require grad."""
    for model, state_dict in zip(models, weights):
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [key for key in state_dict if key not in trained]:
            del state_dict[key]


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    state: TrainerState,
    rank_state: dict,
    trained_only: bool = False,
    keep: int | None = None,
) -> str:
    """Every process writes its part into a temporary folder; the main process renames it once all are done, then
    rotates the checkpoints (`keep`: --save_total_limit).

    A kill at any moment leaves either the previous checkpoints untouched plus a `.tmp-` folder that `latest`
    ignores, or one more complete checkpoint. A machine crash can lose what the page cache had not written yet, so
    every process fsyncs its files before the barrier, and the main process writes the manifest and fsyncs the
    folders around the rename: a checkpoint whose name survived has its files too, or the manifest tells.
    Each barrier is an agreement (`writing(..., together=)`): a process that fails stops every process there.
    Rotation happens before the last one, so no folder is being deleted once any process returns from here: the
    processes may then list the checkpoints (a stop's marker, the health check, a failed write's message).
    """
    final = checkpoint_path(output_dir, state.step)
    tmp = os.path.join(os.path.dirname(final), ".tmp-" + os.path.basename(final))
    with writing(final, output_dir, together=accelerator):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a kill mid-write
            os.makedirs(tmp)
    with writing(final, output_dir, together=accelerator):
        accelerator.save_state(tmp, **(trained_weights_only(accelerator, saving=True) if trained_only else {}))
        write_json(os.path.join(tmp, RANK_STATE_FILE.format(rank=accelerator.process_index)), rank_state)
        sync_tree(tmp)  # this process's files among them; which ones Accelerate wrote where, it does not say
    with writing(final, output_dir, together=accelerator):
        if accelerator.is_main_process:
            write_json(os.path.join(tmp, STATE_FILE), asdict(state), durable=True)
            write_manifest(tmp)
            fsync(tmp)
            if os.path.isdir(final):  # the same step saved twice (a stop right after resuming): same state
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync(os.path.dirname(final))  # the rename itself
            rotate_checkpoints(output_dir, keep, state.best_checkpoint)
    return final


def write_json(path: str, value, durable: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")
        if durable:  # on disk before the rename that makes the checkpoint count
            f.flush()
            os.fsync(f.fileno())


def write_manifest(folder: str) -> None:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            sizes[os.path.relpath(os.path.join(root, name), folder)] = os.path.getsize(os.path.join(root, name))
    write_json(os.path.join(folder, MANIFEST_FILE), dict(sorted(sizes.items())), durable=True)


def sync_tree(folder: str) -> None:
    """fsync every file and folder under `folder`. Another process's file still being written is synced too, which
    is harmless: what counts is that each process syncs its own after writing it."""
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                fsync(os.path.join(root, name))
        fsync(root)


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: that syncs its entries
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Write failures a run cannot get past (a full disk, a quota, a read-only mount). torch.save reports them as a
# RuntimeError from its zip writer, without the errno.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed")


@contextlib.contextmanager
def writing(path: str, output_dir: str, together: Accelerator | None = None):
    """Around every write of a run: a failed write (any OSError; torch's and safetensors' disk-full errors) stops
    with one line naming the path, the space left and the last good checkpoint. Nothing already saved is touched.

    `together`: every process enters the block (the main process may be the only one that writes in it) and they
    agree at its end (`runtime.agree`): a failure in any process stops all of them there, none waits in a barrier."""
    error = None
    try:
        yield
    except UserError as e:
        error = e
    except Exception as e:
        reason = _write_failure(e)
        if reason is None:
            error = e
        else:
            where = getattr(e, "filename", None) or path
            folder = os.path.abspath(where)
            while not os.path.isdir(folder):
                folder = os.path.dirname(folder)
            left = _size(shutil.disk_usage(folder).free)
            saved = complete_checkpoints(output_dir)
            then = (
                f"last good checkpoint: {saved[-1]}: free space there, then resume with --resume_from_checkpoint latest"
                if saved
                else "no checkpoint saved: free space there or choose another --output_dir"
            )
            error = UserError(f"could not write {where}: {reason}, {left} left there; {then}")
    if together is not None:
        runtime.agree(together, error, f"writing {path}")
    if error is not None:
        raise error


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024


def _write_failure(error: BaseException) -> str | None:
    """Why a write failed, if `error` (or one it came from) is a failed write; else None."""
    while error is not None:
        if isinstance(error, OSError):
            return error.strerror or str(error)
        text = str(error)
        for code in DISK_FULL_ERRNOS:  # safetensors: "I/O error: No space left on device (os error 28)"
            if os.strerror(code) in text:
                return os.strerror(code)
        if any(marker in text for marker in TORCH_WRITE_FAILURES):
            return "the write was cut short (torch.save)"
        error = error.__cause__ or error.__context__
    return None


def rotate_checkpoints(output_dir: str, keep: int | None, best: str | None) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints, never the best one, and every universal conversion
    (`.universal-step_N`) whose checkpoint is gone: a conversion lives as long as its source. Returns what was
    deleted. Main process only, inside `save_checkpoint` (before its last agreement: no process lists meanwhile)."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    found = complete_checkpoints(output_dir)[:-keep] if keep else []
    doomed = [p for p in found if best is None or os.path.abspath(p) != os.path.abspath(best)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        source = os.path.join(root, name.removeprefix(UNIVERSAL_PREFIX))
        if name.startswith(UNIVERSAL_PREFIX) and not os.path.isdir(source):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # its links only, never what they point to
            doomed.append(os.path.join(root, name))
    return doomed


def write_preempted(accelerator: Accelerator, output_dir: str, checkpoint: str, step: int, signal_name: str) -> None:
    """The requeue marker: with several processes `accelerate launch` reports any worker's exit code as 1. Written by
    the main process; every process calls this, and none returns before the marker exists (a job script that sees
    one rank gone must find it) or, if it could not be written, all stop with that error."""
    with writing(output_dir, output_dir, together=accelerator):
        if accelerator.is_main_process:
            write_json(
                os.path.join(output_dir, PREEMPTED_FILE),
                {"checkpoint": checkpoint, "step": step, "signal": signal_name},
            )


def clear_preempted(output_dir: str) -> None:
    """Called when a run starts: a stale marker must never requeue a job that later fails for a real reason."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, PREEMPTED_FILE))


def clean_partial_checkpoints(output_dir: str) -> None:
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
