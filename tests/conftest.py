"""Shared fixtures: a tiny random BERT with its own word-level tokenizer, a small learnable text task, the runs that
several test files read, one `launch` helper for real processes, and the rule that marks the unit tests.

Everything is made here, offline, in seconds: the real MiniLM weights appear only in test_pretrained.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds its CPU communication op (about 45 s) into TORCH_EXTENSIONS_DIR, and ninja rebuilds it whenever
# the build command changes: it names the venv's path, so checkouts sharing the default folder rebuilt it each time
# they took turns. One folder per venv path keeps each checkout's build.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(Path.home() / ".cache" / "torch_extensions" / f"tuneloop-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]}"),
)
# The build runs the first `ninja` on PATH, and two differ here: the system's 1.11 and the venv's 1.13 (deepspeed's
# dependency), whose build logs each reads as another command, so every switch rebuilt the op (70-90 s on both cores,
# twice a suite run). The doctor puts this interpreter's scripts first for its launches (doctor.launch_env); so do all
# tests, as an activated venv does: one ninja throughout.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Three topics, each signalled by one of its keywords hidden among filler words.
KEYWORDS = {
    "sports": ["goal", "match", "team"],
    "tech": ["chip", "software", "robot"],
    "music": ["song", "album", "band"],
}
FILLER = "the a of and to in was is on for with that this it at by from new year said people".split()


# Markers that keep a test out of `-m unit`: it launches processes, trains, or needs what CI may not have.
HEAVY_MARKERS = ("multiprocess", "engines", "slurm", "slow", "gpu", "trains", "matrix", "properties", "faults")
# Session fixtures that train the tiny model: a test that reads one of them trains (the first to ask pays).
TRAINING_FIXTURES = {"trained", "tracked", "checkpointed_run", "ddp_run"}
_unit_test_running = False


# pytest-xdist (`-n 2` in pyproject's addopts) hands out tests by group: a whole file to one worker, so its module
# fixtures (a shared launch, the doctor's waves) run once. Files sharing something that cannot be doubled share a group:
# the local SLURM cluster (a session fixture: one per worker otherwise), and launches on a config's fixed port 29500
# (the doctor's, gpu_check's) or the DDP run test_engines and test_multiprocess compare with.
SHARED_GROUPS = {
    "test_slurm.py": "slurm",
    "test_elastic.py": "slurm",
    "test_engines.py": "port-29500",
    "test_gpu_check.py": "port-29500",
    "test_multiprocess.py": "port-29500",
}
# The longest groups start first (about 340, 300, 240 and 100 s of a 1,050 s one-process suite): two workers end
# together only when no long group is left to start last.
FIRST_GROUPS = ("port-29500", "slurm", "test_matrix.py", "test_checkpoint.py")


def xdist_group(path: Path) -> str:
    return SHARED_GROUPS.get(path.name, path.name)


def pytest_xdist_make_scheduler(config, log):
    """The scheduler of the groups above. pytest-xdist's own `--dist loadgroup` no longer groups under pytest 9.2: it
    renames `item._nodeid`, which pytest 9.2 no longer reads, so each test went to either worker and module fixtures
    ran on both (the doctor's waves twice, two SLURM clusters)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(Path(nodeid.split("::", 1)[0]))

    config.option.loadscopereorder = False  # keep the collection's order: FIRST_GROUPS first
    return FileGroups(config, log)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m filtering
def pytest_collection_modifyitems(config, items):
    """`unit`: every test with none of HEAVY_MARKERS, so `pytest -m unit` runs in seconds and needs no marking by
    hand. Under xdist (a worker's collection is the one scheduled), FIRST_GROUPS come first, each in file order."""
    for item in items:
        if TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker("trains")
        if not any(item.get_closest_marker(name) for name in HEAVY_MARKERS):
            item.add_marker("unit")
    if hasattr(config, "workerinput"):
        order = {group: rank for rank, group in enumerate(FIRST_GROUPS)}
        items.sort(key=lambda item: order.get(xdist_group(item.path), len(order)))  # stable: file order kept


@pytest.hookimpl(tryfirst=True)  # before its fixtures are set up
def pytest_runtest_setup(item):
    global _unit_test_running
    _unit_test_running = item.get_closest_marker("unit") is not None


def not_in_a_unit_test(what: str) -> None:
    """Keeps `-m unit` fast: a test that trains or launches without a marker saying so fails here, not silently slow."""
    if _unit_test_running:
        pytest.fail(f"a test counted as `unit` {what}: mark it `trains` (in-process training) or `multiprocess`")


def make_rows(n: int, seed: int, label_as: str = "name") -> list[dict]:
    rng = random.Random(seed)
    names = sorted(KEYWORDS)
    rows = []
    for i in range(n):
        label = i % len(names)
        words = rng.choices(FILLER, k=rng.randint(4, 14))
        words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[names[label]]))
        rows.append({"text": " ".join(words), "label": names[label] if label_as == "name" else label})
    rng.shuffle(rows)
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT (random weights, no dropout so runs compare exactly) and a word-level tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in KEYWORDS.values() for w in ws)]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, model_max_length=128).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT with dropout on: an exact resume must also restore the RNG that draws the dropout masks."""
    out = tmp_path_factory.mktemp("tiny-bert-dropout")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory) -> dict[str, str]:
    """Train (240 rows) and validation (45 rows: not divisible by 2 processes x any batch size used) CSV files."""
    out = tmp_path_factory.mktemp("toy-data")
    return {
        "train_file": write_rows(out / "train.csv", make_rows(240, seed=1)),
        "validation_file": write_rows(out / "validation.csv", make_rows(45, seed=2)),
    }


@pytest.fixture(scope="session")
def test_files(tmp_path_factory) -> dict[str, str]:
    """A labelled test file with an id column (30 rows), and the 45 validation texts without labels, with ids."""
    out = tmp_path_factory.mktemp("test-data")
    labelled = [{"id": f"t{i:03d}", **row} for i, row in enumerate(make_rows(30, seed=3))]
    unlabelled = [{"id": f"u{i:03d}", "text": row["text"]} for i, row in enumerate(make_rows(45, seed=2))]
    return {
        "labelled": write_rows(out / "test.jsonl", labelled),
        "unlabelled": write_rows(out / "unlabelled.csv", unlabelled),
    }


@pytest.fixture(scope="session")
def trained(tiny_model_dir, toy_files, test_files, tmp_path_factory) -> tuple[Path, dict]:
    """The reference tiny run, trained once for every test that reads its outputs: 6 epochs of the toy task, then
    --do_predict on the labelled test file. Returns (output folder, final metrics)."""
    output_dir = tmp_path_factory.mktemp("trained")
    results = run_in_process(
        tiny_args(tiny_model_dir, toy_files, output_dir, do_predict="true", test_file=test_files["labelled"])
    )
    reset_accelerate_state()
    return output_dir, results


@pytest.fixture(scope="session")
def tracked(tiny_model_dir, toy_files, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny run with both trackers on (wandb offline, TensorBoard), 2 epochs (2 evaluations), a log every 2 steps,
    project "toy". Returns (output folder, final metrics)."""
    output_dir = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        results = run_in_process(
            tiny_args(
                tiny_model_dir,
                toy_files,
                output_dir,
                num_train_epochs=2,
                report_to="all",
                logging_steps=2,
                project="toy",
            )
        )
    reset_accelerate_state()
    return output_dir, results


# The 2-process DDP run that test_engines.py holds DeepSpeed to and test_multiprocess.py holds one process to:
# accumulation, active clipping (the pre-clip norms here are 0.2-0.3) and warmup, which DeepSpeed takes over from the
# loop; 8 optimizer steps per epoch (240 rows / (2 ranks x 8 x 2)), and a checkpoint at step 12 of 32 to resume from.
DDP_RUN = dict(
    gradient_accumulation_steps=2,
    max_grad_norm=0.1,
    warmup_steps=0.1,
    num_train_epochs=4,
    eval_strategy="no",
    save_strategy="steps",
    save_steps=12,
)


@pytest.fixture(scope="session")
def ddp_run(tiny_model_dir, toy_files, tmp_path_factory) -> Path:
    """DDP_RUN launched once on 2 CPU processes (cpu_2proc.yaml); returns its output folder."""
    output_dir = tmp_path_factory.mktemp("train-ddp")
    launch(tiny_args(tiny_model_dir, toy_files, output_dir, **DDP_RUN))
    results = read_json(output_dir / "all_results.json")
    assert (results["distributed_type"], results["num_processes"]) == ("MULTI_CPU", 2), results
    return output_dir


def tiny_args(model_dir: str, files: dict[str, str], output_dir, **overrides) -> list[str]:
    """CLI arguments for a fast run on the toy task; overrides are option=value pairs."""
    options = {
        "model_name_or_path": model_dir,
        **files,
        "output_dir": str(output_dir),
        "max_length": 32,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-3,
        "num_train_epochs": 6,
        "logging_steps": 5,
        "warmup_steps": 0,
        "seed": 0,
    }
    options.update(overrides)
    args = []
    for key, value in options.items():
        args += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return args


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; each in-process run must start from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def run_in_process(args: list[str]) -> dict:
    not_in_a_unit_test("trains")
    from tuneloop.config import parse_args
    from tuneloop.loop import train

    return train(parse_args(args))


def launch(
    args: list[str],
    num_processes: int = 2,
    *,
    config: str | None = None,
    module: bool = False,
    launcher: bool = True,
    launch_flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Run tuneloop in real processes, as a user types it: `accelerate launch --config_file accelerate_configs/<config>
    [launch_flags] train.py ARGS` (`-m tuneloop ARGS` with module=True; plain `python train.py ARGS`, no launcher, with
    launcher=False). The config defaults to the CPU config of `num_processes` (cpu.yaml or cpu_2proc.yaml). `env`
    overrides the environment, which drops ACCELERATE_USE_CPU (it would turn DeepSpeed off). With check, the run
    must exit 0."""
    not_in_a_unit_test("launches processes")
    command = launch_command(
        args, num_processes, config=config, module=module, launcher=launcher, launch_flags=launch_flags
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=launch_env(env), cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch_command(
    args: list[str],
    num_processes: int = 2,
    *,
    config: str | None = None,
    module: bool = False,
    launcher: bool = True,
    launch_flags: tuple[str, ...] = (),
) -> list[str]:
    """The command line `launch` runs (also for tests that start it with Popen to signal it)."""
    entry = ["-m", "tuneloop"] if module else [str(ROOT / "train.py")]
    if not launcher:
        return [sys.executable, *entry, *args]
    config = config or ("cpu_2proc.yaml" if num_processes == 2 else "cpu.yaml")
    # Its own rendezvous port: launches elsewhere on the machine (another checkout's tests) cannot join its group.
    port = ["--main_process_port", str(free_port())]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
        *port,
        *launch_flags,
        *entry,
        *args,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "OMP_NUM_THREADS": "1", **(overrides or {})}


def saved_state_only(output_dir: Path, **state) -> Path:
    """A checkpoint folder holding only its state file (TrainerState fields given): enough for what runs before any
    weights load (resume_plan's refusals), which reads nothing else."""
    from tuneloop import checkpoint

    saved = Path(checkpoint.checkpoint_path(str(output_dir), state["step"]))
    saved.mkdir(parents=True)
    (saved / checkpoint.STATE_FILE).write_text(json.dumps(checkpoint.asdict(checkpoint.TrainerState(**state))))
    return saved


def read_json(path) -> dict | list:
    return json.loads(Path(path).read_text())


SLURM_CLUSTER_SCRIPT = ROOT / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="session")
def slurm_conf():
    """A 2-node cluster for the whole session, shared by test_slurm.py and test_elastic.py (about 2 s to start;
    apt-get installs SLURM first if it is missing)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs slurmd as root (and may need apt-get): run the tests as root")
    # Not under pytest's tmp_path: munged wants every folder above its socket searchable by all, and pytest's are 700.
    directory = tempfile.mkdtemp(prefix="tuneloop-slurm-", dir="/tmp")
    started = subprocess.run(
        [str(SLURM_CLUSTER_SCRIPT), "start", directory], capture_output=True, text=True, timeout=600
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"slurm/local_cluster.sh start failed:\n{started.stderr[-3000:]}")
        yield os.path.join(directory, "slurm.conf")
    finally:
        stopped = subprocess.run(
            [str(SLURM_CLUSTER_SCRIPT), "stop", directory], capture_output=True, text=True, timeout=120
        )
        if stopped.returncode == 0:
            shutil.rmtree(directory, ignore_errors=True)
