"""tuneloop's training command with a fault at one phase of the run, for tests/test_faults.py.

    python tests/fault_runner.py PHASE SIGNAL TRAIN_ARGS...   # one run, in this process
    python tests/fault_runner.py --serve                     # many: one JSON request per stdin line, each run forked

The fault is the real signal, sent by the process to itself (`os.kill`) at the moment the phase is under way, from a
wrapper around the function doing that phase; nothing in tuneloop knows about it. SIGKILL ends the process there
(and where the phase writes a file, the file is first left cut in half, as a kill mid-write leaves it); SIGTERM is
delivered and the phase goes on, as it would for a real one. Phases:

- tokenize: the first `data.tokenize` call (set-up);
- first_step: the session's first optimizer step (`optim.clip_and_step`), gradients computed, weights not yet updated;
- checkpoint: the session's first checkpoint write, once Accelerate's files are in the temporary folder;
- best_load: `elastic.load_checkpoint` of the best model after training (`finish_training`);
- final_save: the final model's weights file (`save_pretrained`'s safetensors write);
- predictions: `predict.write_predictions`;
- none: no fault (a reference run, or a rerun).

Just before the fault, what is complete in the output folder is recorded in OUTPUT_DIR.fault.json (beside it): the
complete checkpoints and the SHA-256 of the model and prediction files, for the test to check that none of it was lost
or torn. `--serve` imports everything once and forks one child per request (a run costs seconds, an import of the
stack ten): a request is {"phase", "signal", "args", "log"}, the answer {"returncode"} (-N: killed by signal N).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

# What a finished or earlier run leaves whole, and a fault must not tear.
KEPT_FILES = ("model.safetensors", "config.json", "predictions.jsonl", "predictions.csv", "predict_results.json")
PHASES = ("tokenize", "first_step", "checkpoint", "best_load", "final_save", "predictions", "none")


def output_dir_of(args: list[str]) -> str:
    return args[args.index("--output_dir") + 1]


def complete_files(output_dir: str) -> list[str]:
    """The files of KEPT_FILES that are whole: weights that load, predictions with one row per test example."""
    from safetensors import safe_open

    found = [name for name in KEPT_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if "model.safetensors" in found:
        try:
            with safe_open(os.path.join(output_dir, "model.safetensors"), "pt") as weights:
                [weights.get_tensor(key) for key in weights.keys()]  # noqa: SIM118 (a safetensors handle, not a dict)
        except Exception:  # cut short: not a complete model
            found.remove("model.safetensors")
    for name in ("predictions.jsonl", "predictions.csv"):
        if name in found:
            try:
                with open(os.path.join(output_dir, "predict_results.json")) as f:
                    expected = json.load(f)["test_samples"]
                with open(os.path.join(output_dir, name)) as f:
                    rows = sum(1 for _ in f) - name.endswith(".csv")  # the CSV header
            except (OSError, ValueError, KeyError):
                expected, rows = 0, -1
            if rows != expected:
                found.remove(name)
    return found


def record(output_dir: str, phase: str, signal_name: str) -> None:
    """What is complete in `output_dir` now, just before the fault."""
    from tuneloop import checkpoint

    files = {}
    for name in complete_files(output_dir):
        with open(os.path.join(output_dir, name), "rb") as f:
            files[name] = hashlib.sha256(f.read()).hexdigest()
    done = {
        "phase": phase,
        "signal": signal_name,
        "files": files,
        "checkpoints": [os.path.basename(p) for p in checkpoint.complete_checkpoints(output_dir)],
    }
    with open(os.path.normpath(output_dir) + ".fault.json", "w") as f:
        json.dump(done, f)


def arm(phase: str, signal_name: str, output_dir: str) -> None:
    """Wrap the function of `phase` so that it signals this process once, at that point."""
    import accelerate
    import transformers.modeling_utils

    from tuneloop import data, elastic, optim, predict

    if phase == "none":
        return
    sig = signal.Signals[signal_name]
    killing = sig == signal.SIGKILL
    fired = []

    def fault(half_write=None) -> None:
        """Record, then signal; with SIGKILL first leave `half_write()`'s file cut short. Once per run."""
        fired.append(phase)
        record(output_dir, phase, signal_name)
        if killing and half_write:
            half_write()
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), sig)  # SIGKILL does not return; SIGTERM runs the handler (or the default: exit)

    def wrap(owner, name, around):
        original = getattr(owner, name)
        setattr(owner, name, lambda *a, **k: around(original, *a, **k))

    def first_call(original, *args, **kwargs):
        if not fired:
            fault()
        return original(*args, **kwargs)

    def after_writing(original, *args, **kwargs):  # Accelerator.save_state into the checkpoint's temporary folder
        result = original(*args, **kwargs)
        if not fired:
            fault()
        return result

    def best_load(original, *args, **kwargs):
        if not fired and sys._getframe(2).f_code.co_name == "finish_training":  # not the resume's load in set-up
            fault()
        return original(*args, **kwargs)

    def weights_write(original, tensors, filename, *args, **kwargs):  # transformers' safetensors write
        if fired:
            return original(tensors, filename, *args, **kwargs)

        def half_write():
            original(tensors, filename, *args, **kwargs)
            os.truncate(filename, os.path.getsize(filename) // 2)

        fault(half_write)
        return original(tensors, filename, *args, **kwargs)

    def predictions_write(original, path, rows, *args, **kwargs):
        if not fired:
            fault(lambda: original(path, rows[: len(rows) // 2], *args, **kwargs))
        return original(path, rows, *args, **kwargs)

    if phase == "tokenize":
        wrap(data, "tokenize", first_call)
    elif phase == "first_step":
        wrap(optim, "clip_and_step", first_call)
    elif phase == "checkpoint":
        wrap(accelerate.Accelerator, "save_state", after_writing)
    elif phase == "best_load":
        wrap(elastic, "load_checkpoint", best_load)
    elif phase == "final_save":
        wrap(transformers.modeling_utils, "safe_save_file", weights_write)
    elif phase == "predictions":
        wrap(predict, "write_predictions", predictions_write)
    else:
        raise SystemExit(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")


def run(phase: str, signal_name: str, args: list[str]) -> int:
    from tuneloop import cli

    arm(phase, signal_name, output_dir_of(args))
    return cli.main(args)


def serve() -> None:
    """Answer one request per line of stdin, each run in a forked child with the stack already imported."""
    import matplotlib.figure  # noqa: F401  (the report's: imported once here, not in every child)

    import tuneloop.cli  # noqa: F401
    import tuneloop.loop  # noqa: F401
    import tuneloop.report  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: its own output, its own exit, never back into this loop
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                code = run(request["phase"], request["signal"], request["args"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": returncode}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    elif len(sys.argv) >= 3 and sys.argv[1] in PHASES:
        sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
    else:
        sys.exit(__doc__)
