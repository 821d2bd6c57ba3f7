"""Every engine this CPU can run, for real: 2-process DDP, DeepSpeed ZeRO-2 and ZeRO-3 (`accelerate launch`, gloo).

Each launched run records the engine and world size it actually had in all_results.json, and the tests assert them:
an `ACCELERATE_USE_CPU=1` left in the environment, for instance, silently turns a DeepSpeed launch into plain
MULTI_CPU. FSDP cannot run on CPU through Accelerate (it enables FSDP only for GPU process groups), so its config is
checked by parsing it the way `accelerate launch` does, and a CPU launch of it must stop with a clear error.

Tests marked `engines` launch real processes (engines, the doctor); the others check configs, DeepSpeed's "auto"
values and the doctor's refusals in this process, in milliseconds (they are unit tests).

The first DeepSpeed run on a machine JIT-compiles a shared-memory op (~45 s); keep TORCH_EXTENSIONS_DIR stable.
"""

import csv
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import DDP_RUN, ROOT, launch, launch_env, not_in_a_unit_test, read_json, run_in_process, tiny_args

CONFIGS = ROOT / "accelerate_configs"
# engine -> (accelerate config, the distributed type Accelerate must report inside the run)
ENGINES = {
    "ddp": ("cpu_2proc.yaml", "MULTI_CPU"),
    "zero2": ("deepspeed_zero2_cpu.yaml", "DEEPSPEED"),
    "zero3": ("deepspeed_zero3_cpu.yaml", "DEEPSPEED"),
}
TRAIN = DDP_RUN  # every engine trains conftest's DDP run: the same steps, so DeepSpeed can be held to DDP's numbers
EVAL = dict(do_train="false", per_device_eval_batch_size=8)  # 45 examples on 2 ranks x 8: 3 repeated at the end


def launched(engine: str, args: list[str]) -> dict:
    """`accelerate launch --config_file accelerate_configs/<the engine's config> train.py ARGS`; the run must have had
    that engine on 2 processes."""
    config, kind = ENGINES[engine]
    launch(args, config=config, timeout=600)
    output_dir = Path(args[args.index("--output_dir") + 1])
    results = read_json(output_dir / "all_results.json")
    assert (results["distributed_type"], results["num_processes"]) == (kind, 2), results
    return results


def plain_transformers_accuracy(model_dir, validation_file: str) -> tuple[float, dict]:
    """Load the saved model the way any user would, in this one CPU process, and score it on the eval file."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with open(validation_file, newline="") as f:
        rows = list(csv.DictReader(f))
    inputs = tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**inputs).logits.argmax(dim=-1)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return (predictions == labels).float().mean().item(), model.state_dict()


@pytest.fixture(scope="module")
def engine_run(request, tiny_model_dir, toy_files, tmp_path_factory):
    """Each engine trains TRAIN once (launched on first use; DDP is conftest's `ddp_run`); returns engine -> folder."""
    runs = {}

    def get(engine: str) -> Path:
        if engine == "ddp":
            return request.getfixturevalue("ddp_run")
        if engine not in runs:
            out = tmp_path_factory.mktemp(f"train-{engine}")
            launched(engine, tiny_args(tiny_model_dir, toy_files, out, **TRAIN))
            runs[engine] = out
        return runs[engine]

    return get


@pytest.mark.engines
@pytest.mark.parametrize("engine", list(ENGINES))
def test_train_save_and_reload_in_plain_transformers(engine, engine_run, toy_files):
    out = engine_run(engine)
    results = read_json(out / "all_results.json")
    assert results["global_step"] == 4 * 8  # 240 rows / (2 ranks x 8 x accumulation 2) = 8 steps per epoch
    assert results["eval_accuracy"] > 0.45  # it learned (chance is 1/3), so the comparison below means something
    accuracy, _ = plain_transformers_accuracy(out, toy_files["validation_file"])
    assert round(accuracy * 45) == round(results["eval_accuracy"] * 45)


@pytest.mark.engines
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_trains_exactly_like_ddp(engine, engine_run, toy_files):
    """Same data, seed, accumulation, clipping and schedule: DeepSpeed must not accumulate, clip or step twice.

    Accelerate alone fills DeepSpeed's "auto" clipping with 1.0 instead of --max_grad_norm 0.1: that showed as
    different losses from the first logged step, until tuneloop filled it from the flag.
    """
    ddp, ds = engine_run("ddp"), engine_run(engine)
    # What MFU counts: ZeRO-3 partitions every parameter (numel() 0), and the count must still be the full model's.
    figures = [
        {k: read_json(out / "all_results.json")[k] for k in ("non_embedding_parameters", "model_flops")}
        for out in (ddp, ds)
    ]
    assert figures[1] == figures[0] and figures[0]["non_embedding_parameters"] == 18307, figures
    history = {name: read_json(out / "log_history.json") for name, out in (("ddp", ddp), (engine, ds))}
    for key in ("train/learning_rate", "train/loss", "train/grad_norm"):
        ddp_values = [h[key] for h in history["ddp"] if key in h]
        ds_values = [h[key] for h in history[engine] if key in h]
        assert len(ds_values) == len(ddp_values) >= 6, key
        assert ds_values == pytest.approx(ddp_values, rel=1e-4, abs=1e-7), key
    _, ddp_weights = plain_transformers_accuracy(ddp, toy_files["validation_file"])
    _, ds_weights = plain_transformers_accuracy(ds, toy_files["validation_file"])
    assert ds_weights.keys() == ddp_weights.keys()
    for name in ddp_weights:
        torch.testing.assert_close(ds_weights[name], ddp_weights[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.engines
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_checkpoint_resumes_into_the_same_run(engine, engine_run, tiny_model_dir, toy_files, tmp_path):
    """`save_state` under DeepSpeed writes every rank's ZeRO shards; resuming at step 12 ends where the first run
    did."""
    first = engine_run(engine)
    saved = first / "checkpoints" / "step_0000012"
    manifest = read_json(saved / "manifest.json")  # both ranks' shards, by their size: what `latest` verifies
    for rank in (0, 1):
        assert (saved / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert f"pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in manifest
    resumed = tmp_path / "resumed"
    args = [*tiny_args(tiny_model_dir, toy_files, resumed, **TRAIN), "--resume_from_checkpoint", str(saved)]
    assert launched(engine, args)["global_step"] == 32
    losses = [
        [h["train/loss"] for h in read_json(out / "log_history.json") if "train/loss" in h] for out in (first, resumed)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    expected, got = load_file(first / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.engines
def test_eval_identical_across_engines(engine_run, toy_files, tmp_path):
    """A fixed model (the DDP-trained one) scored by 1 process, ZeRO-2 and ZeRO-3: the same, sample for sample.
    (DDP's 2-process evaluation, the same check: test_predict.py's `tuneloop evaluate` on 2 processes.)"""
    model = str(engine_run("ddp"))
    one = run_in_process(tiny_args(model, toy_files, tmp_path / "one", **EVAL))
    assert one["eval_samples"] == 45
    for engine in ("zero2", "zero3"):
        results = launched(engine, tiny_args(model, toy_files, tmp_path / engine, **EVAL))
        assert results["eval_samples"] == 45, engine  # the 3 repeated samples are dropped, none lost
        assert results["eval_accuracy"] == one["eval_accuracy"], engine
        assert results["eval_f1"] == one["eval_f1"], engine
        assert results["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5), engine


def fsdp_launch_env() -> dict[str, str]:
    """The environment `accelerate launch --config_file accelerate_configs/fsdp.yaml` gives its workers."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_fsdp_config_is_full_shard_and_wraps_each_models_own_layers(monkeypatch, tiny_model_dir):
    """FSDP cannot run on CPU (see the next test), so its config is parsed exactly as the launcher and Accelerate do.

    The file used to name BertLayer as the class to wrap: any other model (and the doctor's probe, an nn.Linear) then
    failed on the GPU with "Could not find the transformer layer class BertLayer". It now names none, and each model's
    own `_no_split_modules` decides: BERT's layers for BERT, RoBERTa's for RoBERTa, through FSDP2's own wrap policy.
    """
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import CPUOffloadPolicy
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
    from transformers.models.roberta.modeling_roberta import RobertaLayer

    env = fsdp_launch_env()
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # no class named: the model's own
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # parameters stay on the GPU
    assert plugin.transformer_cls_names_to_wrap is None

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    plugin.set_auto_wrap_policy(bert)  # what `prepare` runs first under FSDP2; raised for a model without BertLayer
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {BertLayer, BertEmbeddings}
    policy = fsdp2_prepare_auto_wrap_policy(plugin, bert)  # what decides each `fully_shard` unit
    assert sum(map(policy, bert.modules())) == 2 + 1  # the 2 layers and the embeddings

    tiny_roberta = RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    roberta = RobertaForSequenceClassification(tiny_roberta)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(roberta)
    assert RobertaLayer in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    policy = fsdp2_prepare_auto_wrap_policy(plugin, roberta)
    assert sum(isinstance(m, RobertaLayer) for m in roberta.modules() if policy(m)) == 3


@pytest.mark.engines
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fsdp_launch_on_cpu_stops_with_one_clear_line(tiny_model_dir, toy_files, tmp_path):
    """Accelerate would silently run an FSDP launch on CPU as MULTI_CPU data parallelism; tuneloop refuses it."""
    args = tiny_args(tiny_model_dir, toy_files, tmp_path, max_steps=1)
    result = launch(
        args,
        config="fsdp.yaml",
        launch_flags=("--num_processes", "2", "--mixed_precision", "no"),
        check=False,
        timeout=600,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("tuneloop: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "asks for FSDP but Accelerate set up MULTI_CPU" in errors[0]
    assert not (tmp_path / "all_results.json").exists()


def fsdp2_accelerator(mixed_precision: str):
    """A real CPU Accelerator whose state says FSDP2, so `accelerator.prepare` takes its real FSDP2 branch.

    Fakes the GPU check only: Accelerate switches to FSDP for GPU process groups alone, the rest is its own code.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    from conftest import reset_accelerate_state

    reset_accelerate_state()
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert accelerator.is_fsdp2
    return accelerator


def test_evaluation_only_under_fsdp2_places_the_whole_model(tiny_model_dir, toy_files):
    """`--do_train false`, `tuneloop evaluate` and `tuneloop predict` under fsdp.yaml crashed on the GPU: FSDP2's
    prepare refuses a model without its optimizer. Fakes the device check only (`fsdp2_accelerator`): the model is
    placed whole in the run's precision, the dataloader is prepared by Accelerate's real FSDP2 branch, and the
    gathered logits are the model's own."""
    from accelerate.data_loader import DataLoaderShard
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from conftest import make_rows
    from tuneloop import predict
    from tuneloop.engines import prepare_for_evaluation

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [tokenizer(r["text"]) | {"labels": i % 3} for i, r in enumerate(make_rows(10, seed=3))]
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=DataCollatorWithPadding(tokenizer))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    accelerator = fsdp2_accelerator("bf16")
    # (Plain `accelerator.prepare(model, loader)` raised "model and optimizer must be passed together" there; Accelerate
    # 1.16 on CPU fails earlier, setting up a process group, so that failure is not reproduced here.)
    prepared_model, prepared_loader = prepare_for_evaluation(accelerator, model, loader)
    assert prepared_model is model and isinstance(prepared_loader, DataLoaderShard)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # what FSDP's bf16 policy computes in
    outputs = predict.gather(accelerator, prepared_model, prepared_loader)
    with torch.no_grad():
        expected = torch.cat([model(**batch).logits.float() for batch in loader])
    assert outputs.logits.shape == (10, 3)
    torch.testing.assert_close(torch.from_numpy(outputs.logits), expected)
    (only_model,) = prepare_for_evaluation(fsdp2_accelerator("no"), model.float())  # predict-only: no eval loader
    assert {p.dtype for p in only_model.parameters()} == {torch.float32}


def fake_deepspeed_accelerator(ds_config: dict, num_processes: int = 2):
    """A real DeepSpeedPlugin (Accelerate parses the config) behind the three attributes `engines` reads."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=plugin),
        num_processes=num_processes,
        mixed_precision="no",
        device=torch.device("cpu"),
    )


def train_arguments(**overrides):
    from tuneloop.options import TrainArguments

    return TrainArguments(**{"output_dir": "unused", **overrides})


def test_deepspeed_auto_values_come_from_the_trainer():
    from tuneloop.engines import fill_deepspeed_config

    accelerator = fake_deepspeed_accelerator(
        {
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": 2},
        }
    )
    t = train_arguments(per_device_train_batch_size=6, gradient_accumulation_steps=3, max_grad_norm=0.25)
    assert fill_deepspeed_config(accelerator, t) == []
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (
        6,
        3,
        0.25,
    )
    # A DeepSpeed file that leaves clipping out would otherwise mean "no clipping" (DeepSpeed's default).
    accelerator = fake_deepspeed_accelerator({"zero_optimization": {"stage": 2}})
    assert fill_deepspeed_config(accelerator, train_arguments(max_grad_norm=0.5)) == []
    assert accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.5


def test_deepspeed_settings_that_disagree_are_reported_together():
    from tuneloop.engines import fill_deepspeed_config

    accelerator = fake_deepspeed_accelerator(
        {
            "train_batch_size": 999,
            "gradient_clipping": 0.5,
            "optimizer": {"type": "AdamW", "params": {}},
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False},
        }
    )
    problems = fill_deepspeed_config(accelerator, train_arguments(max_grad_norm=1.0))
    assert len(problems) == 4, problems
    text = " ".join(problems)
    for expected in (
        "gradient_clipping=0.5 but --max_grad_norm is 1.0",
        "train_batch_size=999",
        "'optimizer' section",
        "zero3_save_16bit_model: true",
    ):
        assert expected in text


@pytest.mark.engines
def test_deepspeed_switched_off_by_use_cpu_is_refused(tiny_model_dir, toy_files, tmp_path):
    """The trap from the notes: ACCELERATE_USE_CPU=1 with a DeepSpeed config silently trains plain MULTI_CPU."""
    args = tiny_args(tiny_model_dir, toy_files, tmp_path, max_steps=1)
    result = launch(args, config="deepspeed_zero2_cpu.yaml", env={"ACCELERATE_USE_CPU": "1"}, check=False, timeout=600)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("tuneloop: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "asks for DeepSpeed but Accelerate set up MULTI_CPU" in errors[0] and "unset it" in errors[0]


def test_launcher_accumulation_that_overrides_the_trainer_is_refused(monkeypatch):
    """`gradient_accumulation_steps` in an accelerate config reaches the Accelerator and would override the flag."""
    from tuneloop.errors import UserError
    from tuneloop.runtime import make_accelerator

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(UserError, match="gradient accumulation to 4.*the trainer to 1"):
        make_accelerator(train_arguments(max_steps=1))


def test_every_config_is_documented_and_parses():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        "cpu",
        "cpu_2proc",
        "gpu",
        "multi_gpu",
        "multi_node",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "deepspeed_zero3_offload",
        "fsdp",
        "deepspeed_zero2_cpu",
        "deepspeed_zero3_cpu",
    }
    files = {p.stem: p for p in CONFIGS.glob("*.yaml")}
    assert expected <= files.keys()
    for name, path in files.items():
        text = path.read_text()
        assert text.startswith("# ") and "Usually changed:" in text, f"{name}: say what it is for and what to change"
        config = load_config_from_file(str(path))
        ds = config.deepspeed_config or {}
        # Settings that must agree with the trainer are "auto": taken from its flags, never repeated here.
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & ds.keys(), name
        if ds and not config.use_cpu:
            assert ds["deepspeed_multinode_launcher"] == "standard", name  # SLURM: one launch per node, no pdsh
        if ds.get("zero_stage") == 3:
            assert ds["zero3_save_16bit_model"] is True, name
    assert load_config_from_file(str(files["multi_node"])).num_machines > 1
    offload = load_config_from_file(str(files["deepspeed_zero3_offload"])).deepspeed_config
    assert (offload["offload_optimizer_device"], offload["offload_param_device"]) == ("cpu", "cpu")


def test_gpu_configs_keep_the_gpus_the_job_was_given(monkeypatch):
    """gpu.yaml had gpu_ids '0': the launcher then exported CUDA_VISIBLE_DEVICES=0 over the user's or SLURM's choice.
    Parsed and turned into the worker environment exactly as `accelerate launch` does (no GPU needed for that)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    for path in CONFIGS.glob("*.yaml"):
        assert getattr(load_config_from_file(str(path)), "gpu_ids", None) in (None, "all"), path.name
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # e.g. SLURM's GPU for this job
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "gpu.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    _, env = prepare_simple_launcher_cmd_env(args)
    assert env["CUDA_VISIBLE_DEVICES"] == "3"


def doctors(*runs: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """`python -m tuneloop.doctor ARGS` for each ARGS, all started at once, as a user runs it (without
    ACCELERATE_USE_CPU, which turns DeepSpeed off)."""
    not_in_a_unit_test("launches the doctor")
    started = []
    for args in runs:
        command = [sys.executable, "-m", "tuneloop.doctor", *args]
        out, err = (
            tempfile.TemporaryFile("w+"),
            tempfile.TemporaryFile("w+"),
        )  # no pipe to fill while we wait on another
        started.append(
            (
                command,
                subprocess.Popen(command, stdout=out, stderr=err, text=True, env=launch_env(), cwd=ROOT),
                out,
                err,
            )
        )
    results = []
    for command, process, out, err in started:
        process.wait(timeout=900)
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(command, process.returncode, out.read(), err.read()))
    return results


# A config that asks for 2 processes with `distributed_type: MULTI_CPU`, which starts one.
MULTI_CPU = (
    "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\n"
    "use_cpu: true\nmixed_precision: 'no'\n"
)
# The doctor runs of this module, in waves run side by side. The doctor's launches meet on the config's port (29500),
# so a wave holds at most one config of two processes; one-process configs bind no port.
DOCTOR_WAVES = (("cpu.yaml", "multi_cpu.yaml", "deepspeed_zero3_cpu.yaml"), ("cpu_2proc.yaml",))


@pytest.fixture(scope="module")
def doctor_report(tmp_path_factory):
    """config name -> the doctor's CompletedProcess; a config's whole wave runs on its first request."""
    multi_cpu = tmp_path_factory.mktemp("doctor") / "multi_cpu.yaml"
    multi_cpu.write_text(MULTI_CPU)
    arguments = {name: ("--config_file", f"accelerate_configs/{name}") for wave in DOCTOR_WAVES for name in wave}
    arguments["multi_cpu.yaml"] = ("--config_file", str(multi_cpu), "--skip_accelerate_test")
    reports = {}

    def get(config: str) -> subprocess.CompletedProcess:
        if config not in reports:
            wave = next(wave for wave in DOCTOR_WAVES if config in wave)
            reports.update(zip(wave, doctors(*(arguments[name] for name in wave))))
        return reports[config]

    return get


def assert_doctor_passed(result: subprocess.CompletedProcess, config: str, seen: str) -> None:
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert f"ok: {seen}" in result.stdout
    for package in ("torch", "transformers", "accelerate", "deepspeed"):
        assert f"\n  {package} " in result.stdout
    if "deepspeed" in config:  # accelerate test's own script cannot start DeepSpeed on CPU; the doctor says why
        assert "accelerate test: skipped" in result.stdout
    else:
        assert "passed (attempt" in result.stdout
        if "attempt 1 FAILED" in result.stdout:  # Accelerate's CPU test is flaky: passed on retry, reported, not hidden
            warnings.warn(f"accelerate test with {config} failed once, passed on retry:\n{result.stdout}", stacklevel=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only verdict")
@pytest.mark.parametrize("config", ["gpu.yaml", "multi_gpu.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"])
def test_doctor_rejects_gpu_configs_on_this_machine(config, capsys):
    """In this process: the doctor stops at the config check, before any launch. (Its command line and launches are
    the tests below.) Guards a GPU config that this CPU machine would try to launch."""
    from tuneloop import doctor as the_doctor

    assert the_doctor.main(["--config_file", str(CONFIGS / config)]) == 1
    out = capsys.readouterr().out
    assert "GPUs: none" in out
    assert "PROBLEM:" in out and "needs GPUs" in out
    assert "probe:" not in out  # nothing is launched when the config cannot fit


@pytest.mark.engines
@pytest.mark.parametrize(
    "config, seen",
    [
        ("cpu.yaml", "NO x1 on cpu"),
        ("cpu_2proc.yaml", "MULTI_CPU x2 on cpu"),
        ("deepspeed_zero3_cpu.yaml", "DEEPSPEED x2 on cpu"),  # ZeRO-2's config is exercised by the training tests
    ],
)
def test_doctor_and_accelerate_test_pass_on_cpu_configs(config, seen, doctor_report):
    """The probe gets the engine and process count the config asks for, and `accelerate test` passes. Guards a doctor
    that passes a config a training run would not get."""
    assert_doctor_passed(doctor_report(config), config, seen)


@pytest.mark.engines
def test_doctor_fails_a_config_that_starts_fewer_processes_than_it_asks(doctor_report):
    """`distributed_type: MULTI_CPU` with 2 processes starts one: the doctor's probe must say so, not pass."""
    result = doctor_report("multi_cpu.yaml")
    assert result.returncode == 1, result.stdout
    assert "warning: distributed_type MULTI_CPU makes `accelerate launch` start ONE process" in result.stdout
    assert "FAILED: the config asks for 2 processes, the run got 1" in result.stdout


def fake_gpus(monkeypatch, name: str, capability: tuple[int, int], count: int = 1) -> None:
    """Fakes the device checks only: torch.cuda reports `count` GPUs of this kind; torch's own functions run on top
    (is_bf16_supported's real logic included, with an emulated bf16 tensor that would succeed, as on a V100)."""
    properties = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


@pytest.mark.parametrize(
    "name, capability, flagged",
    [("Tesla V100-SXM2-32GB", (7, 0), True), ("Tesla T4", (7, 5), True), ("NVIDIA A100-SXM4-80GB", (8, 0), False)],
)
def test_doctor_flags_bf16_on_gpus_that_only_emulate_it(monkeypatch, name, capability, flagged):
    """torch.cuda.is_bf16_supported() counts emulation and says yes on V100/T4, where bf16 crawls: gpu.yaml's bf16
    passed there. Fakes the GPU (`fake_gpus`); the doctor's static check runs as on that machine."""
    from tuneloop import doctor

    fake_gpus(monkeypatch, name, capability)
    assert torch.cuda.is_bf16_supported()  # the check the doctor used: yes on every one of these cards
    _, problems, _ = doctor.check_config(str(CONFIGS / "gpu.yaml"))
    bf16 = [p for p in problems if "bf16" in p]
    assert bool(bf16) == flagged, problems
    if flagged:
        assert name in bf16[0] and "use fp16" in bf16[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only verdict")
@pytest.mark.parametrize("flags, flagged", [({"avx2", "avx512f"}, True), ({"avx512f", "amx_bf16"}, False)])
def test_doctor_flags_bf16_on_cpus_that_only_emulate_it(monkeypatch, tmp_path, flags, flagged):
    """A CPU config asking for bf16 on a CPU without AMX or AVX-512 bf16 units: a problem, as bf16 on a V100; with
    the units, no problem. Guards a doctor that passes a config which would train 13x slower than fp32."""
    from tuneloop import doctor, runtime

    config = tmp_path / "cpu_bf16.yaml"
    config.write_text((CONFIGS / "cpu.yaml").read_text().replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    _, problems, _ = doctor.check_config(str(config))
    bf16 = [p for p in problems if "bf16" in p]
    assert bool(bf16) == flagged, problems
    if flagged:
        assert "emulated" in bf16[0] and "13x slower" in bf16[0]


def test_doctor_num_processes_replaces_the_configs(monkeypatch):
    """multi_gpu.yaml and fsdp.yaml say 8 processes; the doctor's advice named a --num_processes it did not have.
    Fakes 2 GPUs; the probe's and `accelerate test`'s launches are captured instead of run."""
    from tuneloop import doctor

    fake_gpus(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), count=2)
    _, problems, _ = doctor.check_config(str(CONFIGS / "multi_gpu.yaml"))
    assert problems == [
        "8 processes per machine but this machine has 2 GPU(s): set num_processes to 2 in the config, "
        "or pass --num_processes 2 to both the doctor and `accelerate launch`"
    ]
    config, problems, _ = doctor.check_config(str(CONFIGS / "fsdp.yaml"), num_processes=2)
    assert problems == [] and config.num_processes == 2

    launched = []

    def fake_run(command, **kwargs):
        if "--config_file" in command:  # what `accelerate test` is given is a file: read it while it exists
            launched.append((command, read_yaml(command[command.index("--config_file") + 1])))
        seen = {
            "distributed_type": "FSDP",
            "num_processes": 2,
            "device": "cuda",
            "mixed_precision": "bf16",
            "ranks": [0, 1],
            "steps": 4,
        }
        stdout = doctor.PROBE_TAG + json.dumps(seen) + "\nTest is a success! :)\n"
        return subprocess.CompletedProcess(command, 0, stdout, "")

    monkeypatch.setattr(doctor.subprocess, "run", fake_run)
    assert doctor.run_probe(str(CONFIGS / "fsdp.yaml"), config, num_processes=2)
    assert doctor.run_accelerate_test(str(CONFIGS / "fsdp.yaml"), config, num_processes=2)
    (probe, probe_file), (test, test_file) = launched
    assert probe[probe.index("--num_processes") + 1] == "2" and probe[-3:] == ["-m", "tuneloop.doctor", "--probe"]
    assert "test" in test and test_file["num_processes"] == 2
    assert {k: v for k, v in test_file.items() if k != "num_processes"} == {
        k: v for k, v in probe_file.items() if k != "num_processes"
    }  # the copy changes nothing else


def read_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)
