"""The output folder: one run per folder, one process writing it at a time, and a final model that is never torn.

- **The lock.** The main process holds `fcntl.flock` on `output_dir/.tuneloop.lock` for the run's life: a second run
  into the same folder (a resubmitted job, a typo) stops in one line naming the holder (pid, host, start, command,
  written into the file). The kernel drops the lock when its process dies, however it dies, so a lock left by a
  killed run never blocks. Only the main process locks: the other ranks of a run read the folder, they never own it.
- **The run's identity.** `output_dir/run.json` names the run that owns the folder (its id, written at its first
  start); every checkpoint carries the id of the run that wrote it (`TrainerState.tracker_run_id`, the id trackers
  continue). `--resume_from_checkpoint latest` resumes only checkpoints of the folder's run, so a requeued job (the
  same command) keeps continuing its own run.
- **Another run's work is never lost.** A fresh start into a folder holding another run's checkpoints or final model
  stops, naming the two ways on: `--resume_from_checkpoint latest` (continue it) or `--overwrite_output_dir`, which
  moves the whole folder aside to `<output_dir>.old-<time>` (nothing is deleted) and starts in an empty one.
- **The final model.** Written into `output_dir/.tmp-model`, then made complete on disk (fsynced, a manifest of every
  file and its size) and renamed `.new-model`, then each file is hard-linked over its place in output_dir, then
  `.new-model` goes. At every moment either output_dir holds the old model untouched, or `.new-model` holds the
  whole new one (loadable as it is); a run that finds a `.new-model` (a crash during the moves) finishes the moves
  first. Checkpoints, results and the report beside the model are not touched.
- **Before training.** The folder must be writable and have room for the final model (and a checkpoint): both are
  checked before the first step, so a run does not fail at its end.
- **The results.** `all_results.json`, the run's shareable `run_config.json` and `log_history.json`, written by the
  main process through `checkpoint.writing` (a full disk is one line, on every rank).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from typing import TYPE_CHECKING

from tuneloop import checkpoint, lora
from tuneloop.errors import UserError, is_main_launched_process
from tuneloop.options import Config, ModelArguments, TrainArguments

if TYPE_CHECKING:
    from accelerate import Accelerator

RESULTS_FILE = "all_results.json"
CONFIG_FILE = "run_config.json"
HISTORY_FILE = "log_history.json"
LOCK_FILE = ".tuneloop.lock"
RUN_FILE = "run.json"
STAGING_DIR = ".tmp-model"  # the final model being written: incomplete, deleted when found
READY_DIR = ".new-model"  # the final model complete on disk, its files being moved into place
# What makes a folder a saved model (transformers' config, PEFT's adapter config).
MODEL_MARKERS = ("config.json", lora.ADAPTER_CONFIG)
# Files of an earlier final model that a new save must not leave behind: weights transformers or PEFT would load
# instead of (or beside) the new ones, and an adapter config that would make output_dir read as an adapter folder.
_STALE_MODEL_FILE = re.compile(
    r"^(model|pytorch_model|adapter_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$"
    r"|^(model\.safetensors|pytorch_model\.bin)\.index\.json$|^adapter_config\.json$"
)


# ---------------------------------------------------------------------------------------------------------------- lock
class FolderLock:
    """An exclusive `flock` on output_dir/.tuneloop.lock, held while the file stays open."""

    def __init__(self, output_dir: str):
        self.output_dir, self.fd = output_dir, None
        path = os.path.join(output_dir, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"output_dir {output_dir!r} is not writable ({e.strerror}): pick another --output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"output_dir {output_dir!r} is in use by another run ({holder}): wait for it to end or "
                "stop it, or choose another --output_dir"
            ) from None
        except OSError as e:  # a file system without flock (Lustre mounted without -o flock, some NFS set-ups)
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(
                f"tuneloop: warning: output_dir {output_dir!r} cannot be locked on this file system "
                f"({e.strerror}): nothing stops a second run from writing into it",
                file=sys.stderr,
            )
            return
        self.fd = fd
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the open file drops the flock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its name yet"


# ------------------------------------------------------------------------------------------------- claiming the folder
@contextlib.contextmanager
def claimed(config: Config):
    """For the whole run: the output folder checked, locked by the main process, an interrupted final save finished,
    and with --overwrite_output_dir an earlier run moved aside. Released when the run ends (or its process dies)."""
    m, t = config.model, config.train
    check_not_the_model(m, t)
    lock = None
    if is_main_launched_process():
        check_writable(t.output_dir)
        lock = FolderLock(t.output_dir)
        finish_interrupted_save(t.output_dir)
        if t.do_train and t.overwrite_output_dir and not t.resume_from_checkpoint and earlier_work(t.output_dir):
            lock = move_aside(t.output_dir, lock)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def check_not_the_model(m: ModelArguments, t: TrainArguments) -> None:
    """Refuse an output_dir whose writes would overwrite the model being trained from or evaluated: the model's own
    folder, or one holding it. Evaluation and prediction also never write into a folder holding a saved model (its
    run_config.json, results and report are that model's record)."""
    model = os.path.expanduser(m.model_name_or_path)
    out = os.path.realpath(os.path.expanduser(t.output_dir))
    if os.path.isdir(model):
        inside = os.path.realpath(model) == out or os.path.realpath(model).startswith(out + os.sep)
        if inside and t.do_train:
            raise UserError(
                f"output_dir {t.output_dir!r} is (or holds) the model being trained from "
                f"({m.model_name_or_path!r}): the final save would overwrite it; choose another "
                "--output_dir"
            )
        if inside:
            raise UserError(
                f"output_dir {t.output_dir!r} is (or holds) the model being evaluated "
                f"({m.model_name_or_path!r}): its results would overwrite the model's own files; choose "
                "another --output_dir (tuneloop evaluate/predict default to MODEL/evaluate, MODEL/predict)"
            )
    if not t.do_train and has_model(t.output_dir):
        raise UserError(
            f"output_dir {t.output_dir!r} holds a saved model: results written there would overwrite its "
            "run_config.json, results and report; choose another --output_dir"
        )


def has_model(output_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(output_dir, name)) for name in MODEL_MARKERS)


def check_writable(output_dir: str) -> None:
    """Fail before training, not after it, when the output folder cannot be written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"output_dir {output_dir!r} is not writable ({e.strerror}): pick another --output_dir"
        ) from None


def check_free_space(output_dir: str, model, checkpointing: bool, free_bytes: int | None = None) -> None:
    """Fail before training when the disk cannot hold the final model (and, with checkpoints, one more checkpoint)."""
    # DeepSpeed ZeRO-3 creates the model already sharded: numel() is 0 there, ds_numel the full size.
    sizes = [(getattr(p, "ds_numel", p.numel()) * p.element_size(), p.requires_grad) for p in model.parameters()]
    # A checkpoint holds the trained weights and their AdamW moments (fp32 in every set-up tuneloop runs); frozen
    # weights (LoRA's base model) are in the final model only.
    needed = sum(size for size, _ in sizes) + (3 * sum(size for size, grad in sizes if grad) if checkpointing else 0)
    free = shutil.disk_usage(output_dir).free if free_bytes is None else free_bytes
    if free < needed:
        raise UserError(
            f"output_dir {output_dir!r} has {free / 2**20:.0f} MiB free, a run of this model needs about "
            f"{needed / 2**20:.0f} MiB: free space or choose another --output_dir"
        )


def move_aside(output_dir: str, lock: FolderLock) -> FolderLock:
    """--overwrite_output_dir: rename the whole folder to <output_dir>.old-<time> (nothing deleted) and lock a new,
    empty one. The old folder's lock is held until the new one is: no other run can slip in between."""
    folder = os.path.normpath(os.path.abspath(os.path.expanduser(output_dir)))
    cwd, real = os.path.realpath(os.getcwd()), os.path.realpath(folder)
    if cwd == real or cwd.startswith(real + os.sep):
        raise UserError(
            f"--overwrite_output_dir cannot move {output_dir!r} aside: the run is started from inside it; "
            "start it from elsewhere, or choose another --output_dir"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = f"{folder}.old-{stamp}"
    for n in range(1, 100):
        if not os.path.exists(target):
            break
        target = f"{folder}.old-{stamp}-{n}"
    try:
        os.rename(folder, target)
        os.makedirs(folder)
    except OSError as e:
        raise UserError(
            f"--overwrite_output_dir could not move {output_dir!r} aside to {target!r} ({e.strerror}): "
            "move or remove it yourself, or choose another --output_dir"
        ) from None
    new_lock = FolderLock(output_dir)
    lock.release()
    print(f"tuneloop: --overwrite_output_dir: moved the earlier run in {output_dir!r} to {target!r}", flush=True)
    return new_lock


# ------------------------------------------------------------------------------------------------------- run identity
def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def folder_run_id(output_dir: str) -> str | None:
    """The id of the run that owns output_dir (run.json), or None when no run has recorded itself there."""
    try:
        with open(os.path.join(output_dir, RUN_FILE)) as f:
            return json.load(f)["run_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{os.path.join(output_dir, RUN_FILE)} is unreadable: delete it to let "
            "--resume_from_checkpoint latest take the newest checkpoint"
        ) from None


def record_run(output_dir: str, run_id: str) -> None:
    """Write run.json naming this run, at its first start (kept as it is when it names this run already). Atomic: the
    other ranks may read it meanwhile."""
    if folder_run_id(output_dir) == run_id:
        return
    path = os.path.join(output_dir, RUN_FILE)
    with checkpoint.writing(path, output_dir):
        with open(path + ".tmp", "w") as f:
            json.dump({"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, f)
            f.write("\n")
        os.replace(path + ".tmp", path)


def checkpoints_by_run(output_dir: str) -> dict[str, list[str]]:
    """The saved checkpoints of output_dir grouped by the run that wrote them, each run's oldest first."""
    runs = {}
    for path in checkpoint.saved_checkpoints(output_dir):
        try:
            run_id = checkpoint.read_state(path).tracker_run_id
        except (OSError, ValueError, TypeError):
            continue  # an unreadable state: `latest` never picks it either
        runs.setdefault(run_id, []).append(path)
    return runs


def earlier_work(output_dir: str, run_id: str | None = None) -> list[str]:
    """What output_dir holds of runs other than `run_id` (None: of any run), in words: checkpoints, a final model."""
    owner = folder_run_id(output_dir)
    runs = checkpoints_by_run(output_dir)
    if owner is None and len(runs) == 1:
        owner = next(iter(runs))  # a folder of an earlier tuneloop: its model is its checkpoints' run's
    work = [
        f"{len(paths)} checkpoint{'s' if len(paths) > 1 else ''} of run {other} up to {os.path.basename(paths[-1])}"
        for other, paths in runs.items()
        if other != run_id
    ]
    if has_model(output_dir) and (owner is None or owner != run_id):
        work.append("a final model")
    return work


def choose_run(t: TrainArguments, report) -> tuple[str | None, str]:
    """The checkpoint a training run resumes (None: it starts at step 0) and the id of the run it continues.

    Fresh start: a new run, refused where output_dir holds another run's work (unless --overwrite_output_dir moved it
    aside). `latest`: the newest complete checkpoint of output_dir's run (run.json), or, in a folder of an earlier
    tuneloop without run.json, of the one run its checkpoints belong to; none yet: the same run starts over. A path:
    that checkpoint's run."""
    spec, output_dir = t.resume_from_checkpoint, t.output_dir
    if spec == "latest":
        run_id = folder_run_id(output_dir)
        if run_id is None:
            runs = checkpoints_by_run(output_dir)
            if len(runs) > 1:
                newest = ", ".join(f"run {r}: {paths[-1]}" for r, paths in runs.items())
                raise UserError(
                    f"output_dir {output_dir!r} holds checkpoints of {len(runs)} runs and no {RUN_FILE} "
                    f"saying which is its own ({newest}): pass one with --resume_from_checkpoint PATH"
                )
            run_id = next(iter(runs), None)
        path = checkpoint.find_checkpoint(output_dir, spec, report, run_id=run_id) if run_id else None
        run_id = run_id or new_run_id()
    elif spec:
        path = checkpoint.find_checkpoint(output_dir, spec, report)
        run_id = checkpoint.read_state(path).tracker_run_id
    else:
        path, run_id = None, new_run_id()
    if spec or not t.overwrite_output_dir:  # (with it, a fresh start's main process has moved the earlier run aside)
        refuse_earlier_work(output_dir, run_id, resuming=bool(spec))
    return path, run_id


def refuse_earlier_work(output_dir: str, run_id: str, resuming: bool) -> None:
    work = earlier_work(output_dir, run_id)
    if not work:
        return
    aside = f"{os.path.normpath(output_dir)}.old-<time>"
    if resuming:
        raise UserError(
            f"output_dir {output_dir!r} holds work of another run than the one resumed "
            f"({'; '.join(work)}): move it away, or start over with --overwrite_output_dir (without "
            f"--resume_from_checkpoint: moves the folder to {aside}), or choose another --output_dir"
        )
    raise UserError(
        f"output_dir {output_dir!r} holds another run's work ({'; '.join(work)}): continue it with "
        f"--resume_from_checkpoint latest, or start over with --overwrite_output_dir (moves the folder to "
        f"{aside}, nothing is deleted), or choose another --output_dir"
    )


# -------------------------------------------------------------------------------------------------------- final model
def save_final_model(accelerator, model, tokenizer, output_dir: str, merge_adapter: bool = True) -> None:
    """Save the model and tokenizer (with LoRA: the merged model and adapter/, or the adapter) to output_dir without
    ever leaving it without a complete model: written beside it, then moved in (see the module's docstring).
    Every process takes part (the state dict is gathered from shards under ZeRO-3 and FSDP)."""
    staging = os.path.join(output_dir, STAGING_DIR)
    if accelerator.is_main_process:
        finish_interrupted_save(output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    if lora.is_peft(accelerator.unwrap_model(model)):
        with checkpoint.writing(output_dir, output_dir, together=accelerator):
            lora.save(
                accelerator,
                model,
                tokenizer,
                staging,
                merge_adapter,
                lambda path, _: checkpoint.writing(path, output_dir),
            )
    else:
        state_dict = accelerator.get_state_dict(model)  # collective: gathers shards to the main process
        # Under --torch_compile the compiled blocks' keys read `layer.0._orig_mod.…`: plain transformers would load
        # none.
        state_dict = state_dict and {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}
        with checkpoint.writing(output_dir, output_dir, together=accelerator):
            accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
                staging,
                is_main_process=accelerator.is_main_process,
                save_function=accelerator.save,
                state_dict=state_dict,
            )
            if accelerator.is_main_process:
                tokenizer.save_pretrained(staging)
    # Every process is done with the staging folder (the agreement above) before the main process renames it.
    with checkpoint.writing(output_dir, output_dir, together=accelerator):
        if accelerator.is_main_process:
            checkpoint.sync_tree(staging)
            checkpoint.write_manifest(staging)
            checkpoint.fsync(staging)
            ready = os.path.join(output_dir, READY_DIR)
            os.rename(staging, ready)  # from here the new model is complete on disk
            checkpoint.fsync(output_dir)
            put_in_place(ready, output_dir)


def put_in_place(ready: str, output_dir: str) -> None:
    """Move a complete model from `ready` into output_dir: each file hard-linked over its place (an atomic replace;
    `ready` keeps its whole copy until the end), then an earlier model's leftover weight files removed, then `ready`.
    Repeatable: after a crash it is simply run again."""
    with open(os.path.join(ready, checkpoint.MANIFEST_FILE)) as f:
        files = list(json.load(f))
    for name in files:
        source, target = os.path.join(ready, name), os.path.join(output_dir, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target) and os.path.samefile(source, target):
            continue  # linked before a crash (and rename() of two links of one file would do nothing)
        temporary = os.path.join(os.path.dirname(target), f".{os.path.basename(name)}.incoming")
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:  # a file system without hard links: a copy, synced
            shutil.copyfile(source, temporary)
            checkpoint.fsync(temporary)
        os.replace(temporary, target)
    folders = {os.path.dirname(os.path.join(output_dir, name)) for name in files}
    for folder in folders:
        relative = os.path.relpath(folder, output_dir)
        here = "" if relative == "." else relative
        kept = {os.path.basename(name) for name in files if os.path.dirname(name) == here}
        for name in os.listdir(folder):
            if _STALE_MODEL_FILE.match(name) and name not in kept and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        checkpoint.fsync(folder)
    shutil.rmtree(ready)
    checkpoint.fsync(output_dir)


def finish_interrupted_save(output_dir: str) -> None:
    """A final save a crash interrupted: a half-written `.tmp-model` is deleted (output_dir's model was untouched); a
    complete `.new-model` is moved into place, as the save would have done."""
    shutil.rmtree(os.path.join(output_dir, STAGING_DIR), ignore_errors=True)
    ready = os.path.join(output_dir, READY_DIR)
    if not os.path.isdir(ready):
        return
    if os.path.isfile(os.path.join(ready, checkpoint.MANIFEST_FILE)) and checkpoint.torn(ready) is None:
        print(f"tuneloop: finishing the interrupted save of the final model from {ready}", flush=True)
        put_in_place(ready, output_dir)
    else:
        shutil.rmtree(ready)


# ------------------------------------------------------------------------------------------------------------ results
def save_results(accelerator: Accelerator, config: Config, results: dict, history: list | None = None) -> None:
    """Written by the main process; every process calls this (and stops if the write fails)."""
    out = config.train.output_dir
    with checkpoint.writing(out, out, together=accelerator):
        if accelerator.is_main_process:
            checkpoint.write_json(os.path.join(out, RESULTS_FILE), results)
            # No home paths in it: it travels.
            checkpoint.write_json(os.path.join(out, CONFIG_FILE), config.to_shareable_dict())
            if history is not None:
                checkpoint.write_json(os.path.join(out, HISTORY_FILE), history)
