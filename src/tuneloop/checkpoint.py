"""What a run leaves on disk: checkpoints of the full training state, the fine-tuned model and tokenizer, metrics,
the resolved config.

Model, metric and marker files are written by the main process; for a checkpoint every process writes its own part
(Accelerate's RNG and optimizer shards, its loss sums). Every process takes part in gathering the state dict, which
is what makes the save work when the model is sharded (DeepSpeed ZeRO-3, FSDP).

A checkpoint counts once its folder has its final name; before the rename every file is on disk (fsynced by the
process that wrote it) and listed with its size in a manifest, so a checkpoint torn by a machine crash is recognised
and skipped. Every write of a run goes through `writing`: a full disk stops the run with one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field

from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.constants import RNG_STATE_NAME

from tuneloop import runtime
from tuneloop.options import Config
from tuneloop.errors import UserError

RESULTS_FILE = "all_results.json"
CONFIG_FILE = "run_config.json"
HISTORY_FILE = "log_history.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last, by the main process: a checkpoint without it is incomplete
RANK_STATE_FILE = "loop_state_{rank}.json"  # each process's own running sums
PREEMPTED_FILE = "preempted.json"
MANIFEST_FILE = "manifest.json"  # every other file of the checkpoint and its size, written just before the rename
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
        raise UserError(f"resume_from_checkpoint {spec!r} {reason}: pass a folder from "
                        f"{os.path.join(output_dir, CHECKPOINTS_DIR)} or 'latest'")
    if problem := torn(spec):
        raise UserError(f"resume_from_checkpoint {spec!r} is torn ({problem}): pass an earlier checkpoint or 'latest'")
    return os.path.normpath(spec)  # `step_N/` would put what is made beside it (.universal-step_N) inside it


def read_state(path: str) -> TrainerState:
    with open(os.path.join(path, STATE_FILE)) as f:
        return TrainerState(**json.load(f))


def check_resumable(saved: TrainerState, current: TrainerState, path: str,
                    keys: tuple[str, ...] = ("num_processes", "per_device_train_batch_size",
                                             "gradient_accumulation_steps", "seed", "data_seed",
                                             "max_tokens_per_batch")) -> None:
    """Refuse to resume into different maths: another world size, batch or accumulation changes the data order."""
    changed = [f"{k} {getattr(saved, k)} -> {getattr(current, k)}" for k in keys if getattr(saved, k) != getattr(current, k)]
    if changed:
        raise UserError(f"checkpoint {path} was written with different settings ({', '.join(changed)}): resume with "
                        "the same process count, batch size (or token budget), accumulation and seed, or start a new "
                        "--output_dir")


# What a resumed run must keep, besides the layout and seeds (check_resumable): the model, what it trains on, and the
# maths of every step. Everything else may change on resume: how long (max_steps, num_train_epochs), logging,
# evaluation (when, which sets, which metrics are reported), checkpointing, predictions, merge_adapter, precision and
# engine, and the process count (elastic resume). The optimizer's hyperparameters are in the list because loading
# its state brings back the saved ones: a changed --learning_rate would be ignored without a word.
RESUME_SETTINGS = {
    "model": ("model_name_or_path", "dtype", "attention_dropout", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
              "lora_target_modules"),
    "data": ("max_length", "train_sampling_strategy", "length_grouping_window"),
    "train": ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
              "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "class_weights", "label_smoothing_factor",
              "metric_for_best_model", "greater_is_better"),
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
    return {"labels": list(splits.label_names), "problem_type": problem_type,
            "training data": f"{len(splits.train)} examples, sha256 {digest.hexdigest()[:16]}"}


def check_settings(saved: TrainerState, current: dict, path: str) -> None:
    """Refuse to resume with another value of a recorded setting, naming each (old -> new). A checkpoint written
    before settings were recorded, or a setting it lacks, is not compared."""
    def shown(value) -> str:
        text = repr(value) if not isinstance(value, str) else value
        return text if len(text) <= 80 else text[:77] + "..."

    changed = [f"{key} {shown(saved.settings[key])} -> {shown(value)}" for key, value in current.items()
               if key in saved.settings and saved.settings[key] != value]
    if changed:
        raise UserError(f"checkpoint {path} was written with other settings ({'; '.join(changed)}): resume with the "
                        "settings it was written with, or start a new run (another --output_dir, or "
                        "--overwrite_output_dir without --resume_from_checkpoint)")


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


# Elastic resume: a checkpoint of N processes continued on M. With Accelerate's sharding (split_batches=False, even
# batches) the loader cuts the epoch's one seeded order into batches of the per-device size B and deals batch i to
# rank i % N; accumulation A then makes optimizer step k consume global batches [k*N*A, (k+1)*N*A), i.e. samples
# [k*G, (k+1)*G) with G = B*N*A. Keeping G keeps every step's samples, the averaged gradient and the schedule.
@dataclass(frozen=True)
class Layout:
    processes: int
    per_device_batch: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.processes * self.per_device_batch * self.accumulation

    def __str__(self) -> str:
        return f"{self.processes} processes x batch {self.per_device_batch} x accumulation {self.accumulation}"


def layout_of(state: TrainerState) -> Layout:
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


def resume_state(saved: TrainerState, current: TrainerState, path: str, elastic: bool) -> TrainerState:
    """The saved state to continue from, converted to this session's process count when it differs (elastic).

    `current` holds this session's layout as configured; the returned state holds the layout it will train with.
    Refuses what cannot continue the same run: a changed seed, a changed batch on the same process count, a global
    batch this process count cannot keep. (DeepSpeed ZeRO state of another count is converted later, once the
    Accelerator exists: `universal_checkpoint`.)
    """
    if saved.num_processes == current.num_processes or not elastic:
        check_resumable(saved, current, path)
        return saved
    check_resumable(saved, current, path, keys=("seed", "data_seed", "max_tokens_per_batch"))
    if saved.max_tokens_per_batch:
        # Token-budget batches hold varying numbers of samples, dealt whole to the ranks in turn: no layout of another
        # process count gives the same samples per step.
        raise UserError(f"checkpoint {path} was written by {saved.num_processes} processes with "
                        f"--max_tokens_per_batch {saved.max_tokens_per_batch}, whose batches another process count "
                        f"cannot keep: resume on {saved.num_processes} processes (or start a new --output_dir)")
    before = layout_of(saved)
    global_batch = before.global_batch
    after = keep_global_batch(global_batch, current.num_processes, current.per_device_train_batch_size)
    if after is None:
        working = [keep_global_batch(global_batch, n, current.per_device_train_batch_size)
                   for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise UserError(f"checkpoint {path} was written by {before} (global batch {global_batch}), which "
                        f"{current.num_processes} processes cannot keep: resume on "
                        + "; ".join(str(layout) for layout in working[:8])
                        + " (or start a new --output_dir)")
    # The position in the epoch, saved in this rank's micro-batches of the old layout, becomes global samples and
    # then micro-batches of the new one (exact at an optimizer step; at the epoch's end it covers the whole epoch).
    samples = saved.batches_in_epoch * before.processes * before.per_device_batch
    per_micro_step = after.processes * after.per_device_batch
    return TrainerState(**{
        **asdict(saved),
        "num_processes": after.processes,
        "per_device_train_batch_size": after.per_device_batch,
        "gradient_accumulation_steps": after.accumulation,
        "batches_in_epoch": -(-samples // per_micro_step),
        "length_group_batch_size": saved.length_group_batch_size or before.per_device_batch,
    })


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: TrainerState, rank_state: dict,
                    trained_only: bool = False, keep: int | None = None) -> str:
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
        _write_json(os.path.join(tmp, RANK_STATE_FILE.format(rank=accelerator.process_index)), rank_state)
        _sync_tree(tmp)  # this process's files among them; which ones Accelerate wrote where, it does not say
    with writing(final, output_dir, together=accelerator):
        if accelerator.is_main_process:
            _write_json(os.path.join(tmp, STATE_FILE), asdict(state), durable=True)
            _write_manifest(tmp)
            _fsync(tmp)
            if os.path.isdir(final):  # the same step saved twice (a stop right after resuming): same state
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(os.path.dirname(final))  # the rename itself
            rotate_checkpoints(output_dir, keep, state.best_checkpoint)
    return final


def _write_manifest(folder: str) -> None:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            sizes[os.path.relpath(os.path.join(root, name), folder)] = os.path.getsize(os.path.join(root, name))
    _write_json(os.path.join(folder, MANIFEST_FILE), dict(sorted(sizes.items())), durable=True)


def _sync_tree(folder: str) -> None:
    """fsync every file and folder under `folder`. Another process's file still being written is synced too, which
    is harmless: what counts is that each process syncs its own after writing it."""
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                _fsync(os.path.join(root, name))
        _fsync(root)


def _fsync(path: str) -> None:
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
            then = (f"last good checkpoint: {saved[-1]}: free space there, then resume with --resume_from_checkpoint "
                    "latest" if saved else "no checkpoint saved: free space there or choose another --output_dir")
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


UNIVERSAL_PREFIX = ".universal-"  # beside the checkpoints; `latest` never sees it, rotation deletes it with its source
UNIVERSAL_DONE = "universal.json"  # written last, just before the rename that makes the conversion count


def universal_checkpoint(accelerator: Accelerator, path: str) -> str:
    """DeepSpeed ZeRO saves its optimizer state partitioned by rank; another process count loads it only as a
    universal checkpoint. Converted once, by the main process, with DeepSpeed's own tool, into a sibling folder that
    links the checkpoint's other files. Returns the folder to load from; every process calls it.

    Converted into a `.tmp-` folder that is renamed when complete (a kill leaves a `.tmp-` folder, which the next run
    deletes, never a half conversion taken as done); a conversion that fails (any non-zero exit: an OOM kill leaves
    no message) stops every process with one line naming the exit status."""
    root, name = os.path.split(path)
    universal = os.path.join(root, UNIVERSAL_PREFIX + name)
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
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(path, model_dir), "--output_folder", os.path.join(tmp, model_dir),
               "--inject_missing_state"]  # what Megatron-DeepSpeed records itself; a transformers model has none
    shutil.rmtree(universal, ignore_errors=True)  # one without its UNIVERSAL_DONE: an older version's, unfinished
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        code = done.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        how += " (out of memory?)" if code == -signal.SIGKILL else ""
        last = done.stderr.strip().splitlines()[-1:]
        raise UserError(f"could not convert the DeepSpeed checkpoint {path} for another process count (`"
                        f"{' '.join(command)}` failed, {how}{': ' + last[0] if last else ''}): resume on "
                        f"{read_state(path).num_processes} processes")
    for name in os.listdir(path):  # scheduler, RNG, sampler, loss sums, state: linked
        if name not in (model_dir, "latest", MANIFEST_FILE):
            os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(tmp, name))
    _write_json(os.path.join(tmp, UNIVERSAL_DONE), {"source": os.path.abspath(path), "command": command}, durable=True)
    os.rename(tmp, universal)


def _load_universal(accelerator: Accelerator, universal: bool) -> None:
    """DeepSpeed reads `checkpoint.load_universal` from each engine's parsed config at every load
    (`DeepSpeedEngine.load_universal_checkpoint()`), not from the config dict after `prepare`: set it for this load,
    so that a normal checkpoint loaded later (--load_best_model_at_end after an elastic resume) loads as one."""
    for model in accelerator._models:  # what `load_state` loads: the prepared DeepSpeed engine(s)
        if hasattr(model, "_config"):
            model._config.load_universal_checkpoint = universal


def load_checkpoint(accelerator: Accelerator, path: str, scheduler=None, micro_step: int = 0,
                    trained_only: bool = False) -> dict:
    """Restore Accelerate's state (model, optimizer, scheduler, sampler, RNG of this process); return this process's sums.

    A checkpoint of another process count (elastic resume) is converted after loading: Accelerate's micro-step
    counter (to `micro_step`, this epoch's micro-batches in the new layout), the scheduler's position, a new rank's
    RNG, and the loss sums of all old ranks merged and shared out evenly. Under DeepSpeed it loads from its universal
    conversion (`universal_checkpoint`, made on first use)."""
    saved_processes = read_state(path).num_processes
    rank, processes = accelerator.process_index, accelerator.num_processes
    load_from = path
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if saved_processes != processes:
            load_from = universal_checkpoint(accelerator, path)
        _load_universal(accelerator, saved_processes != processes)
    accelerator.load_state(load_from, **(trained_weights_only(accelerator, saving=False) if trained_only else {}))
    if saved_processes == processes:
        with open(os.path.join(path, RANK_STATE_FILE.format(rank=rank))) as f:
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
        with open(os.path.join(path, RANK_STATE_FILE.format(rank=rank))) as f:
            parts.append(json.load(f))
    shared = {key: sum(p[key] for p in parts) / processes
              for key in ("window_loss", "window_count", "total_loss", "total_count")}
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
        what = f"it pickles {found[1]}, which only a full unpickling could load" if found \
            else " ".join(str(e).split())[:200]
        raise UserError(f"{file} is not an RNG state file that a weights-only load accepts ({what}): resume only from "
                        "checkpoints you trust") from None
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


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
            _write_json(os.path.join(output_dir, PREEMPTED_FILE),
                        {"checkpoint": checkpoint, "step": step, "signal": signal_name})


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
    sizes = [(getattr(p, "ds_numel", p.numel()) * p.element_size(), p.requires_grad) for p in model.parameters()]
    # A checkpoint holds the trained weights and their AdamW moments (fp32 in every set-up tuneloop runs); frozen
    # weights (LoRA's base model) are in the final model only.
    needed = sum(size for size, _ in sizes) + (3 * sum(size for size, grad in sizes if grad) if checkpointing else 0)
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


def save_results(accelerator: Accelerator, config: Config, results: dict, history: list | None = None) -> None:
    """Written by the main process; every process calls this (and stops if the write fails)."""
    out = config.train.output_dir
    with writing(out, out, together=accelerator):
        if accelerator.is_main_process:
            _write_json(os.path.join(out, RESULTS_FILE), results)
            _write_json(os.path.join(out, CONFIG_FILE), config.to_shareable_dict())  # no home paths: it travels
            if history is not None:
                _write_json(os.path.join(out, HISTORY_FILE), history)


def _write_json(path: str, value, durable: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")
        if durable:  # on disk before the rename that makes the checkpoint count
            f.flush()
            os.fsync(f.fileno())
