"""The CUDA-only paths, tested on CPU: each test fakes the one device fact its logic depends on, and says which.

fp16 overflow accounting (Accelerate builds no GradScaler on CPU: the tests hand it torch's CPU one), TF32 switches
(a faked CUDA capability), non-blocking host-to-device copies (a faked CUDA availability). The weights' dtype needs
no fake: a bf16 checkpoint loads the same way on CPU as on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json, run_in_process, tiny_args
from tuneloop import model as models
from tuneloop import optim, runtime
from tuneloop.errors import UserError


def prepared_with_cpu_scaler(fused: bool):
    """An Accelerator as fp16 on a GPU has it, faked on CPU: Accelerate's prepared optimizer around a GradScaler."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what Accelerate builds for fp16 on CUDA
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    return accelerator, *accelerator.prepare(model, optimizer)


@pytest.mark.parametrize("fused", [True, False])
def test_an_fp16_overflow_step_is_reported_skipped(fused):
    """Fakes: the GradScaler is torch's CPU one, set on a CPU Accelerator before `prepare` (as Accelerate does on CUDA).

    Guards against: fused AdamW skipping inside its kernel while the loop counts the step as taken (Accelerate's
    `optimizer_step_was_skipped` reads False there, shown below), so skipped_steps stayed 0 and the schedule moved on.
    """
    accelerator, model, optimizer = prepared_with_cpu_scaler(fused)
    before = model.weight.detach().clone()
    accelerator.backward(model(torch.ones(3, 4)).sum())
    model.weight.grad[0, 0] = float("inf")  # a forced overflow
    assert optim.optimizer_step(accelerator, model, optimizer) is True
    assert torch.equal(model.weight, before), "an overflow step must not change the weights"
    assert accelerator.scaler.get_scale() == 512.0
    assert accelerator.optimizer_step_was_skipped is (not fused)  # Accelerate's own answer: blind to the fused kernel
    optimizer.zero_grad()

    accelerator.backward(model(torch.ones(3, 4)).sum())
    assert optim.optimizer_step(accelerator, model, optimizer) is False
    assert not torch.equal(model.weight, before)


@pytest.mark.trains
def test_the_loop_counts_overflow_steps_and_holds_the_schedule(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """Fakes: a CPU GradScaler in the run's Accelerator (none is built on CPU), and inf gradients on steps 3, 7 and 8
    (a hook on the classifier's weight). Everything else is the real loop with fused AdamW.

    Guards against: skipped_steps staying 0, and the learning-rate schedule advancing on steps that updated nothing
    (the linear decay then ends 3 steps early: at 0 instead of 3/10 of the peak).
    """
    make_accelerator, load_model = runtime.make_accelerator, models.load_model

    def with_scaler(t):
        accelerator = make_accelerator(t)
        accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    def with_overflows(*args, **kwargs):
        model = load_model(*args, **kwargs)
        backward_passes = iter(range(1, 10_000))
        model.classifier.weight.register_hook(lambda g: g * float("inf") if next(backward_passes) in (3, 7, 8) else g)
        return model

    monkeypatch.setattr(runtime, "make_accelerator", with_scaler)
    monkeypatch.setattr(models, "load_model", with_overflows)
    results = run_in_process(
        tiny_args(
            tiny_model_dir,
            toy_files,
            tmp_path,
            max_steps=10,
            mixed_precision="fp16",
            max_grad_norm=0,
            logging_steps=5,
            eval_strategy="no",
        )
    )
    assert results["global_step"] == 10 and results["skipped_steps"] == 3
    assert results["final_learning_rate"] == pytest.approx(3e-3 * 3 / 10)  # 7 scheduler steps of a 10-step decay
    logged = {
        e["step"]: e["train/skipped_steps"] for e in read_json(tmp_path / "log_history.json") if "train/loss" in e
    }
    assert logged == {5: 1, 10: 3}


@pytest.fixture
def tf32_switches():
    """Both process-wide TF32 flags (plain globals in torch, settable without CUDA), restored after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(
    "flag, capability, start, expected",
    [
        (None, (8, 0), False, True),
        (None, (7, 0), True, False),
        (False, (9, 0), True, False),
        (True, (7, 5), False, True),
    ],
)
def test_tf32_switches_follow_the_flag(flag, capability, start, expected, tf32_switches, monkeypatch):
    """Fakes: a CUDA device (`torch.device("cuda")` needs no GPU) and its compute capability.

    Guards against --tf32 false being ignored: Accelerate sets matmul TF32 on by itself under torch.compile without
    mixed precision (`start` True here stands for that), and set_up_kernels used to only ever switch it on.
    """
    from tuneloop.options import TrainArguments

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = start
    runtime.set_up_kernels(TrainArguments(tf32=flag), torch.device("cuda"))
    assert tf32_switches() == (expected, expected)
    runtime.set_up_kernels(TrainArguments(tf32=True), torch.device("cpu"))  # a CPU run leaves them alone
    assert tf32_switches() == (expected, expected)


@pytest.mark.parametrize("cuda", [True, False])
def test_host_to_device_copies_do_not_block_on_cuda(cuda, monkeypatch):
    """Fakes: CUDA availability. Guards against pinned batches copied to the GPU with blocking copies."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    configuration = runtime.dataloader_configuration()
    assert configuration.non_blocking is cuda and configuration.use_seedable_sampler


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT saved in bfloat16, as tuneloop's own DeepSpeed-bf16 runs save theirs."""
    import shutil

    from transformers import AutoModel

    out = tmp_path_factory.mktemp("tiny-bert-bf16")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    AutoModel.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(out)
    assert read_json(out / "config.json")["dtype"] == "bfloat16"
    return str(out)


def saved_dtypes(output_dir) -> set[torch.dtype]:
    return {tensor.dtype for tensor in load_file(str(output_dir / "model.safetensors")).values()}


@pytest.mark.trains
def test_a_bf16_checkpoint_trains_in_fp32_unless_asked(bf16_model_dir, toy_files, tmp_path, capsys):
    """Guards against transformers 5's dtype="auto" training a bf16 checkpoint as pure bf16 (no fp32 master copy).
    The saved model keeps the dtype the loop trained in; evaluate/predict of it inherit the training dtype."""
    from tuneloop import cli

    short = dict(max_steps=4, eval_strategy="no", do_eval="false")
    run_in_process(tiny_args(bf16_model_dir, toy_files, tmp_path / "default", **short))
    assert saved_dtypes(tmp_path / "default") == {torch.float32}
    assert "no fp32 master copy" not in capsys.readouterr().out

    run_in_process(tiny_args(bf16_model_dir, toy_files, tmp_path / "bf16", dtype="bfloat16", **short))
    assert saved_dtypes(tmp_path / "bf16") == {torch.bfloat16}
    warnings = [line for line in capsys.readouterr().out.splitlines() if "no fp32 master copy" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --dtype bfloat16"), warnings
    assert read_json(tmp_path / "bf16" / "run_config.json")["model"]["dtype"] == "bfloat16"
    assert cli.inherited_settings(str(tmp_path / "bf16"))["dtype"] == "bfloat16"


@pytest.mark.trains
def test_float16_on_cpu_stops_before_the_weights_load(bf16_model_dir, toy_files, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the dtype was checked")

    monkeypatch.setattr(models, "load_model", must_not_load)
    with pytest.raises(UserError, match=r"^--dtype float16 on CPU: .*use --dtype float32 or bfloat16$"):
        run_in_process(tiny_args(bf16_model_dir, toy_files, tmp_path, dtype="float16"))
