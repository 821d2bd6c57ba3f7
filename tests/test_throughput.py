"""The speed figures: FLOP counter against a hand count, the peak table, padding and token counts, MFU in results."""

from __future__ import annotations

import pytest
import torch

from conftest import run_in_process, tiny_args
from tuneloop import throughput


def test_non_embedding_parameters_match_a_hand_count(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    # hidden 32, intermediate 64, 2 layers, 3 labels; embeddings (word, position, token type) excluded.
    per_layer = 4 * (32 * 32 + 32) + 64 + (32 * 64 + 64) + (64 * 32 + 32) + 64  # q k v o, LN, FFN in, FFN out, LN
    hand = 64 + 2 * per_layer + (32 * 32 + 32) + (32 * 3 + 3)  # embedding LayerNorm, layers, pooler, classifier
    assert throughput.non_embedding_parameters(model) == hand == 18307
    # Two sequences of 3 and 7 real tokens: 6 N per token, plus attention's 12 * layers * width * length^2.
    assert (
        throughput.training_flops(hand, 2, 32, tokens=3 + 7, squared_lengths=9 + 49) == 6 * hand * 10 + 12 * 2 * 32 * 58
    )


# The real `torch.cuda.get_device_name()` strings with their compute capability, and the dense datasheet peak
# (bf16, fp16, fp32 with TF32 on, fp32 with TF32 off). A substring match gave the L40 the L4's peak, the NVL cards
# the SXM ones', V100/T4 an fp16 figure for bf16, and none at all for A40, A6000, RTX 4090, H800, B200.
GPUS = [
    ("NVIDIA H100 80GB HBM3", (9, 0), (989.5, 989.5, 494.5, 67.0)),
    ("NVIDIA H100 PCIe", (9, 0), (756.5, 756.5, 378.0, 51.0)),
    ("NVIDIA H100 NVL", (9, 0), (835.5, 835.5, 417.5, 60.0)),
    ("NVIDIA H200", (9, 0), (989.5, 989.5, 494.5, 67.0)),
    ("NVIDIA H200 NVL", (9, 0), (835.5, 835.5, 417.5, 60.0)),
    ("NVIDIA H800", (9, 0), (989.5, 989.5, 494.5, 67.0)),
    ("NVIDIA B200", (10, 0), (2250.0, 2250.0, 1100.0, 75.0)),
    ("NVIDIA A100-SXM4-80GB", (8, 0), (312.0, 312.0, 156.0, 19.5)),
    ("NVIDIA A100 80GB PCIe", (8, 0), (312.0, 312.0, 156.0, 19.5)),
    ("NVIDIA L4", (8, 9), (121.0, 121.0, 60.0, 30.3)),
    ("NVIDIA L40", (8, 9), (181.0, 181.0, 90.5, 90.5)),
    ("NVIDIA L40S", (8, 9), (362.0, 362.0, 183.0, 91.6)),
    ("NVIDIA A10G", (8, 6), (70.0, 70.0, 35.0, 31.2)),
    ("NVIDIA A10", (8, 6), (125.0, 125.0, 62.5, 31.2)),
    ("NVIDIA A40", (8, 6), (149.7, 149.7, 74.8, 37.4)),
    ("NVIDIA RTX A6000", (8, 6), (154.8, 154.8, 77.4, 38.7)),
    ("NVIDIA GeForce RTX 4090", (8, 9), (165.2, 165.2, 82.6, 82.6)),
    ("Tesla V100-SXM2-32GB", (7, 0), (None, 125.0, 15.7, 15.7)),  # no bf16 and no TF32 units below 8.0
    ("Tesla T4", (7, 5), (None, 65.0, 8.1, 8.1)),
    # Not listed: no figure rather than a wrong one.
    ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", (8, 0), (None, None, None, None)),  # a slice of the card
    ("NVIDIA H100", (8, 0), (None, None, None, None)),  # a listed-looking name with another capability
    ("Some Future GPU", (12, 0), (None, None, None, None)),
]


@pytest.mark.parametrize("name, capability, peaks", GPUS)
def test_gpu_peak_lookup(name, capability, peaks):
    got = tuple(
        throughput.gpu_peak_tflops(name, capability, precision, tf32)
        for precision, tf32 in (("bf16", True), ("fp16", True), ("no", True), ("no", False))
    )
    assert got == peaks


def test_peak_reads_the_name_and_capability_of_the_device(monkeypatch):
    """Fakes the CUDA device queries: the run's peak is the table's for what torch reports about its device."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert throughput.peak_tflops(torch.device("cuda", 0), "bf16", None) == 362.0
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a process-wide switch (no monkeypatch for it): put it back
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert throughput.peak_tflops(torch.device("cuda", 0), "no", None) == 91.6
        torch.backends.cuda.matmul.allow_tf32 = True
        assert throughput.peak_tflops(torch.device("cuda", 0), "no", None) == 183.0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_cpu_peak_is_probed_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "PROBE_CACHE", tmp_path / "peak.json")
    rng = torch.get_rng_state()
    first = throughput.cpu_peak_tflops(torch.float32, seconds=0.2)
    assert torch.equal(torch.get_rng_state(), rng), "the probe must not move the global RNG (a first run would differ)"
    assert 0.001 < first < 100 and (tmp_path / "peak.json").is_file()
    assert throughput.cpu_peak_tflops(torch.float32, seconds=0.2) == first  # read back, not measured again
    assert throughput.peak_tflops(torch.device("cpu"), "no", override=3.5) == 3.5


def test_speed_meter_counts_real_tokens_and_padding(tiny_model_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    meter = throughput.SpeedMeter(model, torch.device("cpu"), run_started=0.0)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    meter.add_batch({"attention_mask": mask})
    meter.end_step()
    figures = meter.summary(Accelerator(cpu=True), peak=1.0, seconds=0.5)
    assert figures["padding_fraction"] == round(1 - 10 / 16, 4)
    assert figures["train_tokens_per_second"] == 20.0 and figures["seconds_per_step"] == 0.5
    assert figures["mfu"] == pytest.approx(figures["model_tflops_per_second"], rel=1e-3)  # peak 1 TFLOP/s
    assert figures["peak_memory_gib"] > 0.01


@pytest.mark.trains
def test_every_run_reports_speed_and_mfu(tiny_model_dir, toy_files, tmp_path):
    results = run_in_process(tiny_args(tiny_model_dir, toy_files, tmp_path, num_train_epochs=1, peak_tflops=0.1))
    assert results["train_tokens_per_second"] > 0 and 0 < results["padding_fraction"] < 1
    assert results["mfu"] == pytest.approx(results["model_tflops_per_second"] / 0.1, rel=1e-2)
    assert results["time_to_first_step"] > 0 and results["peak_memory_gib"] > 0.1


@pytest.mark.trains
def test_speed_switches_keep_the_loss_curve(tiny_model_dir, toy_files, tmp_path):
    """Each switch against the plain path on the same seed: the allocator set-up changes no arithmetic at all;
    --mixed_precision auto is bf16 close to it where the CPU has bf16 units and exactly it where it has none; the
    fast attention dropout stays close to torch's own. Guards a switch that changes the maths it promises to keep,
    and an 'auto' that picks bf16 where it is slow (or silently stays in fp32 where it is fast)."""
    from conftest import read_json, reset_accelerate_state
    from tuneloop.runtime import fast_bf16_available

    def curve(name, **options):
        results = run_in_process(
            tiny_args(
                tiny_model_dir, toy_files, tmp_path / name, logging_steps=1, seed=1, num_train_epochs=2, **options
            )
        )
        reset_accelerate_state()
        losses = [e["train/loss"] for e in read_json(tmp_path / name / "log_history.json") if "train/loss" in e]
        return results, torch.tensor(losses)

    _, plain_losses = curve("plain", tune_cpu_allocator="false")
    _, allocator_losses = curve("allocator", tune_cpu_allocator="true")
    assert torch.equal(allocator_losses, plain_losses)
    auto, auto_losses = curve("auto", mixed_precision="auto")
    if fast_bf16_available():  # bf16 units: auto is bf16, whose rounding moves the curve a little, not a lot
        assert auto["mixed_precision"] == "bf16"
        assert not torch.equal(auto_losses, plain_losses)  # bf16 did run: fp32 would give these exact numbers
        assert (auto_losses - plain_losses).abs().mean() < 0.05
    else:  # none: auto must be the plain path itself, bit for bit
        assert auto["mixed_precision"] == "no"
        assert torch.equal(auto_losses, plain_losses)
    _, losses = curve("attention-dropout", attention_dropout=0.1)  # the tiny model's own is 0
    assert read_json(tmp_path / "attention-dropout" / "config.json")["attention_probs_dropout_prob"] == 0.1
    assert (losses - plain_losses).abs().mean() < 0.05  # (accuracy is no guide here: this toy task can plateau)
    # The same dropout through torch's own kernels (SDPA's math path): another random stream, the same curve.
    _, torch_losses = curve("torch-dropout", attention_dropout=0.1, fast_cpu_dropout="false")
    assert not torch.equal(torch_losses, losses)  # the switch did change the path
    assert (torch_losses - losses).abs().mean() < 0.05


@pytest.mark.trains
def test_torch_compile_keeps_the_loss_curve_and_saves_a_plain_model(tiny_model_dir, toy_files, tmp_path):
    """--torch_compile: Accelerate's regional compilation on padded-length buckets. Same curve as eager (inductor
    reorders float sums), checkpoints written, and the final model loads in plain transformers with every weight."""
    from transformers import AutoModelForSequenceClassification

    from conftest import read_json, reset_accelerate_state

    def curve(name, **options):
        # Eval batches of 15 split the 45 examples evenly: one evaluation graph to compile, not one per batch shape.
        run_in_process(
            tiny_args(
                tiny_model_dir,
                toy_files,
                tmp_path / name,
                logging_steps=1,
                seed=1,
                num_train_epochs=1,
                per_device_eval_batch_size=15,
                **options,
            )
        )
        reset_accelerate_state()
        return torch.tensor(
            [e["train/loss"] for e in read_json(tmp_path / name / "log_history.json") if "train/loss" in e]
        )

    eager = curve("eager", pad_to_multiple_of=32)
    compiled = curve("compiled", torch_compile="true", save_strategy="steps", save_steps=10)
    assert len(compiled) == len(eager) == 30
    assert (compiled - eager).abs().max() < 0.02
    assert (tmp_path / "compiled" / "checkpoints" / "step_0000020").is_dir()
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "compiled", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert not any("_orig_mod" in key for key in model.state_dict())


def test_zero3_partitioned_parameters_count_in_full(tiny_model_dir):
    """Fakes ZeRO-3's partitioning (an empty local tensor with the full size in `ds_numel`), as DeepSpeed leaves each
    parameter outside a forward pass. Guards against MFU counting 0 parameters under ZeRO-3."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    for parameter in model.parameters():
        parameter.ds_numel = parameter.numel()
        parameter.data = torch.empty(0)
    assert throughput.non_embedding_parameters(model) == 18307
