"""Elastic resume (issue 18): a checkpoint written by N processes continues on M, keeping the global batch, every
step's samples and the schedule. Real processes on this CPU; the 2-process run never stopped is the reference."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import launch, read_json, run_in_process, saved_state_only, tiny_args
from test_checkpoint import interrupt, weights
from tuneloop import checkpoint, elastic
from tuneloop.config import parse_args
from tuneloop.errors import UserError
from tuneloop.preemption import REQUEUE_EXIT_CODE
from tuneloop.setup import resume_plan

# 240 rows / global batch 8 = 30 steps per epoch, 60 in all; a linear schedule with warmup, so a scheduler left at
# the wrong position changes every later learning rate. The tiny model has no dropout.
RUN = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    num_train_epochs=2,
    logging_steps=1,
    warmup_steps=0.1,
    eval_strategy="no",
)
STOPPABLE = dict(save_strategy="steps", save_steps=7)  # the first checkpoint tells `interrupt` that training is on
LOG_SAMPLES = {"TUNELOOP_LOG_SAMPLE_IDS": "1"}


@pytest.fixture(autouse=True)
def log_sample_ids(monkeypatch):
    for key, value in LOG_SAMPLES.items():  # launches inherit os.environ
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, toy_files, tmp_path_factory) -> Path:
    """2 processes x batch 4 x accumulation 1, never stopped."""
    out = tmp_path_factory.mktemp("elastic-reference")
    launch(tiny_args(tiny_model_dir, toy_files, out, **RUN), 2, env=LOG_SAMPLES)
    results = read_json(out / "all_results.json")
    assert (results["num_processes"], results["distributed_type"]) == (2, "MULTI_CPU")
    return out


def samples_per_step(output_dir: Path) -> dict[int, list[int]]:
    """Step -> the sample ids it used, in the global order: ranks in turn within each micro-step (how Accelerate
    deals batches: global batch i goes to rank i % N)."""
    per_rank = []
    for path in sorted((output_dir / "sample_ids").glob("rank_*.jsonl"), key=lambda p: int(p.stem.split("_")[1])):
        steps: dict[int, list[list[int]]] = {}
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).append(entry["ids"])
        per_rank.append(steps)
    merged: dict[int, list[int]] = {}
    for step in sorted(set().union(*per_rank)):
        micro = [ranks.get(step, []) for ranks in per_rank]
        # Interleave: micro-step j of rank r is global batch j * N + r.
        for j in range(max(len(m) for m in micro)):
            for m in micro:
                merged.setdefault(step, []).extend(m[j] if j < len(m) else [])
    return merged


def relative_error(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """|got - expected| / |expected| over all weights together: per tensor, the attention key biases (norm about 1e-5:
    softmax ignores them, so they barely move) would turn float noise into large ratios."""
    assert expected.keys() == got.keys()
    difference = sum(((got[k] - expected[k]).double() ** 2).sum() for k in expected) ** 0.5
    return (difference / sum((expected[k].double() ** 2).sum() for k in expected) ** 0.5).item()


def learning_rates(output_dir: Path) -> dict[int, float]:
    return {
        e["step"]: e["train/learning_rate"]
        for e in read_json(output_dir / "log_history.json")
        if "train/learning_rate" in e
    }


def check_same_run(reference: Path, resumed: Path, processes: int, stopped_at: int) -> None:
    expected, got = samples_per_step(reference), samples_per_step(resumed)
    assert len(expected) == 60 and got.keys() == expected.keys()
    differ = [s for s in expected if got[s] != expected[s]]
    assert not differ, f"steps {differ} used other samples than the uninterrupted run (stopped at {stopped_at})"
    assert learning_rates(resumed) == pytest.approx(learning_rates(reference), rel=1e-9)
    ref_results, results = read_json(reference / "all_results.json"), read_json(resumed / "all_results.json")
    assert results["num_processes"] == processes and results["global_step"] == ref_results["global_step"] == 60
    assert results["final_learning_rate"] == pytest.approx(0.0, abs=1e-12)
    assert results["train_loss"] == pytest.approx(ref_results["train_loss"], rel=1e-5)  # merged loss sums
    error = relative_error(weights(reference), weights(resumed))
    print(f"stopped at step {stopped_at}; largest relative weight difference {error:.2e}")
    assert error <= 1e-5


@pytest.mark.multiprocess
def test_two_processes_stopped_mid_epoch_resume_on_one(reference, tiny_model_dir, toy_files, tmp_path):
    """SIGUSR1 to a 2-process run; resumed on 1 process, which takes accumulation 2. Guards a data position counted in
    the wrong process's batches, a scheduler left at 2 ticks per step, lost loss sums of rank 1."""
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, toy_files, out, **RUN, **STOPPABLE)
    code, stderr = interrupt(args, out, signal.SIGUSR1, 2)
    assert code != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in stderr, stderr[-3000:]
    stopped_at = read_json(out / "preempted.json")["step"]
    assert 7 <= stopped_at < 60

    done = launch([*args, "--resume_from_checkpoint", "latest"], 1, launcher=False)
    layout = [line for line in done.stdout.splitlines() if "elastic resume" in line]
    assert (
        len(layout) == 1
        and "2 processes x batch 4 x accumulation 1 -> 1 processes x batch 4 x accumulation 2" in layout[0]
    ), done.stdout[-2000:]
    check_same_run(reference, out, 1, stopped_at)

    # Where the signal lands is chance; an odd step matters here (Accelerate's micro-step counter comes back in the
    # old layout's count, and under accumulation 2 an odd one steps the optimizer after one micro-batch). The periodic
    # checkpoint of step 7 is odd: resume it too, in this process (1 process, accumulation 2).
    again = tmp_path / "from-step-7"
    shutil.copytree(out / "checkpoints" / "step_0000007", again / "checkpoints" / "step_0000007")
    run_in_process(tiny_args(tiny_model_dir, toy_files, again, **RUN, resume_from_checkpoint="latest"))
    expected, got = samples_per_step(reference), samples_per_step(again)
    assert sorted(got) == list(range(8, 61)) and all(got[s] == expected[s] for s in got)
    assert relative_error(weights(reference), weights(again)) <= 1e-5


@pytest.mark.multiprocess
def test_one_process_stopped_resumes_on_two(reference, tiny_model_dir, toy_files, tmp_path):
    """1 process x batch 4 x accumulation 2 (the reference's global batch), stopped by SIGTERM, resumed on 2 processes
    with the same command line: accumulation becomes 1. Guards a new rank without RNG or loss sums, and a data
    position not converted to the new rank count (rank 1 would replay or skip batches)."""
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, toy_files, out, **{**RUN, "gradient_accumulation_steps": 2}, **STOPPABLE)
    code, stderr = interrupt(args, out, signal.SIGTERM, 1)
    assert code == REQUEUE_EXIT_CODE, stderr[-3000:]
    stopped_at = read_json(out / "preempted.json")["step"]

    done = launch([*args, "--resume_from_checkpoint", "latest"], 2)
    assert "1 processes x batch 4 x accumulation 2 -> 2 processes x batch 4 x accumulation 1" in done.stdout
    check_same_run(reference, out, 2, stopped_at)
    for saved in checkpoint.complete_checkpoints(str(out)):  # the resumed session's checkpoints record its layout
        state = checkpoint.read_state(saved)
        expected = elastic.Layout(1, 4, 2) if state.step <= stopped_at else elastic.Layout(2, 4, 1)
        assert elastic.layout_of(state) == expected and state.length_group_batch_size == 4


def test_layouts_keep_the_global_batch():
    assert elastic.keep_global_batch(8, 1, 4) == elastic.Layout(1, 4, 2)
    assert elastic.keep_global_batch(8, 4, 4) == elastic.Layout(4, 2, 1)  # the batch shrinks only when it must
    assert elastic.keep_global_batch(12, 2, 4) == elastic.Layout(2, 3, 2)
    assert elastic.keep_global_batch(4, 3, 1) is None  # the 4 x 1 -> 3


def test_refusals_name_what_works(tmp_path, tiny_model_dir, toy_files, monkeypatch):
    """--elastic_resume false keeps the old refusal; a process count that cannot keep the global batch is refused with
    the layouts that can. Both before the Accelerator or any weights (the checkpoint's state file is all they read), so
    the process count a launcher announces is set here as the launcher sets it."""
    out = tmp_path / "run"
    saved = saved_state_only(
        out, step=12, batches_in_epoch=12, num_processes=4, per_device_train_batch_size=1, gradient_accumulation_steps=1
    )
    args = tiny_args(tiny_model_dir, toy_files, out, per_device_train_batch_size=1, resume_from_checkpoint="latest")
    with pytest.raises(UserError, match=r"num_processes 4 -> 1.*same process count"):
        resume_plan(parse_args([*args, "--elastic_resume", "false"]))
    monkeypatch.setenv("WORLD_SIZE", "3")  # what the launcher tells a process of a 3-process run
    with pytest.raises(
        UserError,
        match=r"global batch 4\), which 3 processes cannot keep: resume on 1 processes x "
        r"batch 1 x accumulation 4; 2 processes x batch 1 x accumulation 2; 4 processes",
    ):
        resume_plan(parse_args(args))
    monkeypatch.setenv("WORLD_SIZE", "2")
    config, path, resumed, notes = resume_plan(parse_args(args))
    assert (config.train.per_device_train_batch_size, config.train.gradient_accumulation_steps) == (1, 2)
    assert path == str(saved) and resumed.step == 12 and resumed.batches_in_epoch == 24  # 48 samples in: 24 per rank
    assert notes == [
        "tuneloop: elastic resume: 4 processes x batch 1 x accumulation 1 -> 2 processes x batch 1 x "
        "accumulation 2 (global batch 4 kept), step 12, epoch 0 at micro-batch 24"
    ]


def fake_deepspeed(processes: int = 1, universal_loaded: bool = False):
    """What `universal_checkpoint` and `load_checkpoint` use of a prepared DeepSpeed Accelerator: its rank, one engine
    whose parsed config holds the universal flag (as `prepare` left it), and `load_state`, which records the folder it
    was given and the flag at that moment."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=universal_loaded))
    loads = []
    accelerator = SimpleNamespace(
        is_main_process=True,
        process_index=0,
        num_processes=processes,
        device=torch.device("cpu"),
        distributed_type=DistributedType.DEEPSPEED,
        _models=[engine],
        step=0,
        wait_for_everyone=lambda: None,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={})),
        load_state=lambda path, **kwargs: loads.append((path, engine._config.load_universal_checkpoint)),
    )
    return accelerator, loads


def zero_checkpoint(output_dir: Path, step: int, processes: int) -> Path:
    """A checkpoint folder as a ZeRO run of `processes` leaves it (only what these tests read: the state, each rank's
    loss sums, an RNG file, the engine's folder)."""
    saved = saved_state_only(output_dir, step=step, num_processes=processes, per_device_train_batch_size=4)
    (saved / "pytorch_model").mkdir()
    (saved / "random_states_0.pkl").write_bytes(b"rng")
    sums = dict(window_loss=0.0, window_count=0, total_loss=1.0, total_count=1, nonfinite_streak=0, skipped_steps=0)
    for rank in range(processes):
        (saved / checkpoint.RANK_STATE_FILE.format(rank=rank)).write_text(json.dumps(sums))
    return saved


def converter(monkeypatch, returncode: int = 0, stderr: str = "") -> list[list[str]]:
    """Fakes DeepSpeed's ds_to_universal run (a subprocess): it writes its output folder, then exits with
    `returncode`. Returns the commands run."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        (Path(command[command.index("--output_folder") + 1]) / "zero").mkdir(parents=True)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return commands


@pytest.mark.parametrize(
    "returncode, stderr, said",
    [
        (-9, "", "killed by SIGKILL (out of memory?)"),  # the OOM killer: no message at all
        (
            1,
            "Traceback (most recent call last):\nKeyError: 'param_shapes'\n",
            "exit status 1: KeyError: 'param_shapes'",
        ),
    ],
)
def test_a_failed_universal_conversion_stops_and_leaves_nothing(returncode, stderr, said, tmp_path, monkeypatch):
    """DeepSpeed's converter runs in a subprocess (faked: `converter`). Any non-zero exit stops with one line naming
    the exit status or signal, and leaves no folder a later run would take as converted. Guards an OOM-killed
    conversion (exit -9, empty stderr) counted as a success, and its half-written folder loaded as a checkpoint."""
    saved = zero_checkpoint(tmp_path, 5, processes=2)
    accelerator, _ = fake_deepspeed()
    converter(monkeypatch, returncode, stderr)
    with pytest.raises(UserError) as raised:
        elastic.universal_checkpoint(accelerator, str(saved))
    message = str(raised.value)
    assert said in message and message.endswith("resume on 2 processes") and "\n" not in message, message
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step_0000005"]


def test_a_conversion_cut_short_is_done_again(tmp_path, monkeypatch):
    """A kill after DeepSpeed's converter finished, while the checkpoint's other files were being linked (staged: the
    folder lists trainer_state.json first, and the link after it raises). The next attempt must convert again and
    link everything, not take the folder for done because its trainer_state.json is there. Guards a conversion whose
    completion was not explicit."""
    saved = zero_checkpoint(tmp_path, 5, processes=2)
    accelerator, loads = fake_deepspeed()
    commands = converter(monkeypatch)
    link, made, listdir = os.symlink, [], os.listdir
    monkeypatch.setattr(
        os, "listdir", lambda path: sorted(listdir(path), key=lambda name: name != checkpoint.STATE_FILE)
    )

    def killed_after_the_state(source, target):
        if checkpoint.STATE_FILE in made:
            raise KeyboardInterrupt  # the kill
        link(source, target)
        made.append(os.path.basename(target))

    monkeypatch.setattr(os, "symlink", killed_after_the_state)
    with pytest.raises(KeyboardInterrupt):
        elastic.universal_checkpoint(accelerator, str(saved))
    monkeypatch.setattr(os, "symlink", link)
    checkpoint.clean_partial_checkpoints(str(tmp_path))  # what the next run does first
    universal = Path(elastic.universal_checkpoint(accelerator, str(saved)))
    assert len(commands) == 2 and universal.name == ".universal-step_0000005"
    linked = {p.name for p in universal.iterdir() if p.is_symlink()}
    assert linked == {p.name for p in saved.iterdir()} - {"pytorch_model"}, linked


def test_the_universal_flag_is_set_for_each_load(tmp_path, monkeypatch):
    """Under DeepSpeed the engine reads `load_universal` from its own parsed config at every load. After an elastic
    resume (a 2-process checkpoint loaded as universal on 1 process), --load_best_model_at_end loads a checkpoint this
    1-process session saved: it must load as a normal one. Fakes the prepared Accelerator and the converter. Guards
    the flag set once for the resume and left on (the best checkpoint then fails to load: no `zero/` folder)."""
    old, new = zero_checkpoint(tmp_path, 5, processes=2), zero_checkpoint(tmp_path, 8, processes=1)
    accelerator, loads = fake_deepspeed(universal_loaded=True)  # as the resume's universal load left the engine
    elastic.load_checkpoint(accelerator, str(new))  # the best checkpoint, saved by this 1-process session
    assert loads == [(str(new), False)]
    converter(monkeypatch)
    elastic.load_checkpoint(accelerator, str(old))  # one from before the resume: its universal conversion
    assert loads[1:] == [(str(old.parent / ".universal-step_0000005"), True)]


def test_a_resume_path_with_a_trailing_slash(tmp_path, tiny_model_dir, toy_files, monkeypatch):
    """`--resume_from_checkpoint out/checkpoints/step_0000005/` (a shell's completion adds the slash): the path is
    normalised where it enters, so the universal conversion goes beside the checkpoint, not inside it (dirname and
    basename of a path ending in `/`). Guards `.universal-` folders made inside checkpoints."""
    saved = zero_checkpoint(tmp_path / "run", 5, processes=2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    _, path, _, _ = resume_plan(
        parse_args(
            tiny_args(
                tiny_model_dir,
                toy_files,
                tmp_path / "run",
                per_device_train_batch_size=4,
                resume_from_checkpoint=str(saved) + "/",
            )
        )
    )
    assert path == str(saved)
    accelerator, _ = fake_deepspeed()
    converter(monkeypatch)
    assert elastic.universal_checkpoint(accelerator, path) == str(saved.parent / ".universal-step_0000005")
    assert not any(p.name.startswith(".universal") for p in saved.iterdir())


@pytest.mark.engines
def test_deepspeed_zero2_two_processes_resume_on_one(tiny_model_dir, toy_files, tmp_path):
    """ZeRO-2 on 2 processes, 10 steps of LoRA with activation checkpointing, an adapter-only checkpoint at step 5
    (DeepSpeed leaves the frozen base out); the same checkpoint resumed on 1 process goes through DeepSpeed's universal
    checkpoint (converted at resume) and must end as the 2-process run did: every step's loss and the weights. (LoRA's
    dropout is off: each process count draws its own dropout masks.) Also the LoRA + activation checkpointing run under
    ZeRO-2 that issue 16 asks for (tests/test_peft.py holds ZeRO-3 to DDP). Guards optimizer shards of the old rank
    count loaded as they are, and a conversion that loses state (its first version, without the micro-step fix,
    already differed at the first step after resuming)."""
    reference = tmp_path / "reference"
    args = dict(
        **{**RUN, "max_steps": 10},
        save_strategy="steps",
        save_steps=5,
        use_peft="true",
        lora_dropout=0,
        activation_checkpointing="true",
    )
    launch(tiny_args(tiny_model_dir, toy_files, reference, **args), config="deepspeed_zero2_cpu.yaml", timeout=600)
    assert read_json(reference / "all_results.json")["num_processes"] == 2
    resumed = tmp_path / "resumed"
    shutil.copytree(reference / "checkpoints" / "step_0000005", resumed / "checkpoints" / "step_0000005")
    done = launch(
        [*tiny_args(tiny_model_dir, toy_files, resumed, **args), "--resume_from_checkpoint", "latest"],
        config="deepspeed_zero2_cpu.yaml",
        launch_flags=("--num_processes", "1"),
        timeout=600,
    )
    assert "2 processes x batch 4 x accumulation 1 -> 1 processes x batch 4 x accumulation 2" in done.stdout
    results = read_json(resumed / "all_results.json")
    assert (results["num_processes"], results["distributed_type"], results["global_step"]) == (1, "DEEPSPEED", 10)
    assert (resumed / "checkpoints" / ".universal-step_0000005" / "pytorch_model" / "zero").is_dir()
    losses = {e["step"]: e["train/loss"] for e in read_json(resumed / "log_history.json") if "train/loss" in e}
    expected = {e["step"]: e["train/loss"] for e in read_json(reference / "log_history.json") if "train/loss" in e}
    assert sorted(losses) == list(range(1, 11))  # steps 1-5 come with the checkpoint's history
    assert all(losses[s] == pytest.approx(expected[s], rel=1e-6) for s in losses)
    assert relative_error(weights(reference), weights(resumed)) <= 1e-5

    # The same resume with --load_best_model_at_end: the first evaluation after it (step 6) stays the best (no later
    # one beats it by the threshold), so the end loads step 6's checkpoint, saved by this 1-process session: a
    # normal DeepSpeed checkpoint, which must not load as universal (the flag of the resume's load). Rotation
    # (--save_total_limit 1) deletes step 5 and its universal conversion once step 6 is saved.
    best = tmp_path / "best"
    shutil.copytree(reference / "checkpoints" / "step_0000005", best / "checkpoints" / "step_0000005")
    done = launch(
        [
            *tiny_args(tiny_model_dir, toy_files, best, **{**args, "eval_strategy": "steps"}),
            "--eval_steps",
            "2",
            "--load_best_model_at_end",
            "true",
            "--early_stopping_threshold",
            "1e9",
            "--save_total_limit",
            "1",
            "--resume_from_checkpoint",
            str(best / "checkpoints" / "step_0000005") + "/",
        ],
        config="deepspeed_zero2_cpu.yaml",
        launch_flags=("--num_processes", "1"),
        timeout=600,
    )
    assert f"from {best / 'checkpoints' / 'step_0000005'}" in done.stdout  # the trailing `/` normalised
    assert "loading the best model (step 6" in done.stdout, done.stdout[-2000:]
    results, history = read_json(best / "all_results.json"), read_json(best / "log_history.json")
    assert (results["num_processes"], results["best_step"], results["global_step"]) == (1, 6, 10)
    step_6 = next(e for e in history if e["step"] == 6 and "eval_loss" in e)
    assert results["eval_loss"] == pytest.approx(step_6["eval_loss"], rel=1e-6)  # step 6's weights, evaluated again
    # Kept: the best, and the last step's (checkpointed before the best weights are loaded, so that a stop signal
    # during the finish resumes there); step 5 and its universal conversion rotated away.
    assert sorted(p.name for p in (best / "checkpoints").iterdir()) == ["step_0000006", "step_0000010"]


# FSDP2 itself cannot run on CPU through Accelerate, so its elastic path rests on torch's distributed checkpoint, which
# reshards on load: tested here directly, FSDP2 (fully_shard) on 2 gloo processes saving, one plain process loading.
FSDP_SAVE = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
for layer in (model[0], model[2], model):
    fully_shard(layer)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
torch.manual_seed(1 + dist.get_rank())
for _ in range(3):
    model(torch.randn(4, 6)).sum().backward(); optimizer.step(); optimizer.zero_grad()
model_state, optimizer_state = get_state_dict(model, optimizer)
assert dist.get_world_size() == 2 and model_state["0.weight"].to_local().shape == (5, 6)  # each rank holds half
dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=sys.argv[1])
full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    torch.save(full, sys.argv[2])
dist.barrier()  # both ranks done before the group goes (else gloo's teardown can abort a rank: runtime.end_together)
dist.destroy_process_group()
"""
FSDP_LOAD = """
import sys, torch, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model(torch.zeros(1, 6)).sum().backward(); optimizer.step(); optimizer.zero_grad()  # state of the right shapes
model_state, optimizer_state = get_state_dict(model, optimizer)
state = {"model": model_state, "optim": optimizer_state}
dcp.load(state, checkpoint_id=sys.argv[1])
set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
expected_model, expected_optimizer = torch.load(sys.argv[2], weights_only=False)
got_model, got_optimizer = get_state_dict(model, optimizer)
assert all(torch.equal(got_model[k], v) for k, v in expected_model.items())
assert all(
    torch.equal(got_optimizer["state"][k][n], t) for k, s in expected_optimizer["state"].items() for n, t in s.items()
)
print("resharded", len(expected_model), "tensors and", len(expected_optimizer["state"]), "optimizer states")
"""


@pytest.mark.multiprocess
def test_sharded_checkpoint_of_two_processes_loads_into_one(tmp_path):
    """Torch's distributed checkpoint (what Accelerate's FSDP2 SHARDED_STATE_DICT saves through) written by 2 FSDP2
    ranks loads into 1 process: weights and AdamW moments equal to the gathered originals. Guards the premise of
    the FSDP path, untested on GPUs (README)."""
    import subprocess
    import sys

    from conftest import free_port, launch_env, not_in_a_unit_test

    not_in_a_unit_test("launches processes")
    (tmp_path / "save.py").write_text(FSDP_SAVE)
    (tmp_path / "load.py").write_text(FSDP_LOAD)
    saved, expected = str(tmp_path / "sharded"), str(tmp_path / "expected.pt")
    save = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(tmp_path / "save.py"),
            saved,
            expected,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=launch_env(),
    )
    assert save.returncode == 0, save.stderr[-3000:]
    assert sorted(p.name for p in Path(saved).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    load = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), saved, expected],
        capture_output=True,
        text=True,
        timeout=300,
        env=launch_env(),
    )
    assert load.returncode == 0 and "resharded 4 tensors and 4 optimizer states" in load.stdout, load.stderr[-3000:]


@pytest.mark.slurm
def test_slurm_job_requeued_onto_fewer_nodes_finishes(slurm_conf, tiny_model_dir, toy_files, tmp_path):
    """`sbatch --nodes=1-2`: the first run gets both nodes (1 process each); USR1 checkpoints and requeues it while
    node n2 is drained, so the rerun gets n1 alone and resumes the 2-process checkpoint on 1 process. Guards a node
    range the scripts do not honour, and a requeued job that refuses (or silently restarts) on the smaller world."""
    from test_slurm import FINAL_STATES, job_info, read_log, slurm, submit, wait_for_job, wait_for_line

    out = tmp_path / "out"
    args = tiny_args(tiny_model_dir, toy_files, out, **{**RUN, "max_steps": 100, "logging_steps": 25})
    # With a range SLURM allocates the fewest nodes that hold the job's tasks (Slurm 22.05): 2 tasks, up to 2 a node,
    # take both nodes when both are free and fit on one when only one is.
    job = submit(
        slurm_conf,
        "train_multi_node.sbatch",
        args,
        tmp_path,
        "--nodes=1-2",
        "--ntasks=2",
        "--ntasks-per-node=2",
        TUNELOOP_PROCS_PER_NODE="1",
    )
    log = tmp_path / f"tuneloop-multi-{job}.out"
    try:
        wait_for_line(log, r"\b25/100 ")  # training is under way on both nodes
        assert job_info(slurm_conf, job)["NodeList"] == "n[1-2]"
        slurm(slurm_conf, "scontrol", "update", "nodename=n2", "state=drain", "reason=elastic-test")
        slurm(slurm_conf, "scancel", "--signal=USR1", "--batch", job)
        # Slurm 22.05 requeues the job asking for the node count its first run got (NumNodes=2, NumTasks=4): it would
        # wait for n2. Giving the range back to the pending job is the admin's step this test cannot avoid.
        deadline = time.monotonic() + 120
        while (state := job_info(slurm_conf, job))["JobState"] != "PENDING" or state["Restarts"] != "1":
            assert time.monotonic() < deadline and state["JobState"] not in FINAL_STATES, read_log(log)[-3000:]
            time.sleep(0.5)
        slurm(slurm_conf, "scontrol", "update", f"jobid={job}", "NumNodes=1-2", "NumTasks=2")
        info = wait_for_job(slurm_conf, job, log)
    finally:  # the cluster is shared by the session: n2 back in service (an error if it was never drained)
        subprocess.run(
            ["scontrol", "update", "nodename=n2", "state=resume"],
            capture_output=True,
            env={**os.environ, "SLURM_CONF": slurm_conf},
            timeout=60,
        )
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-5000:]
    assert (info["NumNodes"], info["NodeList"]) == ("1", "n1")
    saved = checkpoint.read_state(checkpoint.complete_checkpoints(str(out))[0])
    assert elastic.layout_of(saved) == elastic.Layout(2, 4, 1)  # the world before the requeue
    results = read_json(out / "all_results.json")
    assert (results["num_processes"], results["global_step"]) == (1, 100)  # and after it
    assert "2 processes x batch 4 x accumulation 1 -> 1 processes x batch 4 x accumulation 2" in text
    assert "--num_machines 2 --num_processes 2" in text and "--num_machines 1 --num_processes 1" in text
