"""How fast a run goes, in units a person can compare: samples/s, real tokens/s, padding, step time, memory, MFU.

MFU (model FLOPs utilisation) counts the FLOPs the model needs for the real, non-padding tokens (6 per non-embedding
parameter per token for a forward and backward pass, plus attention's 12 * layers * width * length per token, as in
the PaLM paper's appendix B) and divides their rate by the device's peak for the precision in use. Padding costs time
but does no useful work, so a run that pads less gets a higher MFU for the same maths.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import NamedTuple

import torch


class GpuPeak(NamedTuple):
    """One card's dense (no sparsity) peak TFLOP/s, and the compute capability that card reports."""

    capability: tuple[int, int]
    half: float  # fp16 tensor cores with fp32 accumulation (training's); bf16 too, from capability 8.0
    tf32: float | None  # tf32 tensor cores (None before Ampere: fp32 matmuls run at the fp32 rate)
    fp32: float  # plain fp32 (non-tensor)


# Keyed by the exact `torch.cuda.get_device_name()` string: a substring match gave the L40 the L4's peak and the NVL
# cards the SXM ones'. A name not listed (a new card, or a MIG slice such as "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
# which has a fraction of the card's units) gets no peak, hence no MFU, rather than a wrong one; --peak_tflops sets it.
# Sources: NVIDIA's datasheets (H100, H200, H800, HGX B200, A100, A10, A40, RTX A6000, L4, L40, L40S, V100, T4) and
# the Ampere GA102 / Ada AD102 whitepapers (RTX A6000, RTX 4090: fp16/bf16 with fp32 accumulation); datasheets quote
# tensor-core figures "with sparsity", halved here. The A10G is AWS's: NVIDIA publishes no datasheet for it, and
# its figures are the ones commonly quoted for it (g5 instances), not a datasheet's.
_H100_SXM = GpuPeak((9, 0), 989.5, 494.5, 67.0)
_H100_PCIE = GpuPeak((9, 0), 756.5, 378.0, 51.0)
_H_NVL = GpuPeak((9, 0), 835.5, 417.5, 60.0)  # H100 NVL and H200 NVL, per GPU
_A100 = GpuPeak((8, 0), 312.0, 156.0, 19.5)  # SXM4 and PCIe, 40 and 80 GB
_V100_SXM2 = GpuPeak((7, 0), 125.0, None, 15.7)
_V100_PCIE = GpuPeak((7, 0), 112.0, None, 14.0)
GPU_PEAK_TFLOPS = {
    "NVIDIA B200": GpuPeak((10, 0), 2250.0, 1100.0, 75.0),
    "NVIDIA H200": _H100_SXM,  # SXM: the H100's compute with more memory
    "NVIDIA H200 NVL": _H_NVL,
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _H_NVL,
    "NVIDIA H800": _H100_SXM,  # the H100 SXM's compute, export variant (less NVLink and FP64)
    "NVIDIA H800 PCIe": _H100_PCIE,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A40": GpuPeak((8, 6), 149.7, 74.8, 37.4),
    "NVIDIA A10": GpuPeak((8, 6), 125.0, 62.5, 31.2),
    "NVIDIA A10G": GpuPeak((8, 6), 70.0, 35.0, 31.2),
    "NVIDIA RTX A6000": GpuPeak((8, 6), 154.8, 77.4, 38.7),
    "NVIDIA L40S": GpuPeak((8, 9), 362.0, 183.0, 91.6),
    "NVIDIA L40": GpuPeak((8, 9), 181.0, 90.5, 90.5),
    "NVIDIA L4": GpuPeak((8, 9), 121.0, 60.0, 30.3),
    "NVIDIA GeForce RTX 4090": GpuPeak((8, 9), 165.2, 82.6, 82.6),
    "Tesla V100-SXM2-16GB": _V100_SXM2,
    "Tesla V100-SXM2-32GB": _V100_SXM2,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla V100S-PCIE-32GB": GpuPeak((7, 0), 130.0, None, 16.4),
    "Tesla T4": GpuPeak((7, 5), 65.0, None, 8.1),
}
PROBE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneloop" / "peak_flops.json"


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters that do work per token: everything but the embedding tables (a lookup costs no FLOPs).

    Under DeepSpeed ZeRO-3 each parameter is partitioned and `numel()` is 0; `ds_numel` is its full size.
    """
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in embedding)


def training_flops(
    non_embedding_params: int, num_layers: int, hidden_size: int, tokens: int, squared_lengths: int
) -> float:
    """FLOPs of a forward and backward pass over sequences with these real tokens (sum of lengths and of squares)."""
    return 6.0 * non_embedding_params * tokens + 12.0 * num_layers * hidden_size * squared_lengths


def gpu_peak_tflops(device_name: str, capability: tuple[int, int], mixed_precision: str, tf32: bool) -> float | None:
    """Datasheet peak for the precision in use on a listed GPU (`torch.cuda.get_device_name()` and
    `get_device_capability()`, both as reported), or None when the card is not listed or reports another capability."""
    card = GPU_PEAK_TFLOPS.get(device_name)
    if card is None or card.capability != tuple(capability):
        return None
    if mixed_precision == "bf16":
        # Below 8.0 (V100, T4) bf16 has no tensor cores: torch emulates it, far below any listed figure.
        return card.half if card.capability >= (8, 0) else None
    if mixed_precision == "fp16":
        return card.half
    return card.tf32 if tf32 and card.tf32 else card.fp32


def cpu_peak_tflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured matmul peak of this CPU at the current thread count, cached per (CPU, threads, dtype)."""
    key = f"{cpu_name()}|{torch.get_num_threads()}|{dtype}|{torch.__version__}"
    cache = json.loads(PROBE_CACHE.read_text()) if PROBE_CACHE.is_file() else {}
    if key not in cache:
        # Its own generator: the probe runs on the first run only, and must not shift that run's random numbers.
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(2048, 2048, generator=generator).to(dtype)
        b = torch.randn(2048, 2048, generator=generator).to(dtype)
        a @ b  # warm-up: thread pool and kernel selection
        # The best of five bursts: a peak is a maximum, and a burst that shared the cores with something else is
        # not one (one long burst under load once cached 0.137 TFLOP/s here, against 0.335 quiet).
        rates = []
        for _ in range(5):
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 5:
                a @ b
                runs += 1
            rates.append(2 * 2048**3 * runs / (time.perf_counter() - start) / 1e12)
        cache[key] = max(rates)
        PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = PROBE_CACHE.with_suffix(f".{os.getpid()}.tmp")  # several processes may probe at once
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(PROBE_CACHE)
    return cache[key]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peak_tflops(device: torch.device, mixed_precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        return gpu_peak_tflops(
            torch.cuda.get_device_name(device),
            torch.cuda.get_device_capability(device),
            mixed_precision,
            torch.backends.cuda.matmul.allow_tf32,
        )
    if device.type == "cpu":
        # fp16 on CPU runs in fp32 (Accelerate), so only bf16 changes the peak.
        return cpu_peak_tflops(torch.bfloat16 if mixed_precision == "bf16" else torch.float32)
    return None


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the most memory tensors ever held. CPU: this process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SpeedMeter:
    """Token and time counts for one session of a run; sums stay on the device until `summary` (no host sync)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, run_started: float):
        config = model.config
        self.params = non_embedding_parameters(model)
        self.layers, self.hidden = config.num_hidden_layers, config.hidden_size
        self.device = device
        self.real_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.squared_lengths = torch.zeros((), dtype=torch.int64, device=device)
        self.padded_tokens = 0  # shapes are known on the host: no sync
        self.samples = 0
        self.steps = 0
        self.run_started = run_started  # when set-up began: time to first step includes loading and preparing
        self.first_step_seconds = None

    def add_batch(self, batch: dict) -> None:
        lengths = batch["attention_mask"].sum(dim=1)
        self.real_tokens += lengths.sum()
        self.squared_lengths += (lengths * lengths).sum()
        self.padded_tokens += batch["attention_mask"].numel()
        self.samples += batch["attention_mask"].shape[0]

    def end_step(self) -> None:
        self.steps += 1
        if self.first_step_seconds is None:
            self.first_step_seconds = time.perf_counter() - self.run_started

    def summary(self, accelerator, peak: float | None, seconds: float) -> dict:
        """Whole-run figures: counts summed over processes, rates over `seconds` of this session's training loop."""
        counts = torch.tensor(
            [self.real_tokens.item(), self.squared_lengths.item(), self.padded_tokens, self.samples],
            dtype=torch.float64,
            device=accelerator.device,
        )
        real, squared, padded, samples = accelerator.reduce(counts, "sum").tolist()
        memory = accelerator.gather(torch.tensor([peak_memory_gib(accelerator.device)], device=accelerator.device))
        flops = training_flops(self.params, self.layers, self.hidden, int(real), int(squared))
        achieved = flops / seconds / 1e12
        return {
            "non_embedding_parameters": self.params,  # what MFU counts: the same for every engine
            "model_flops": round(flops),  # this session's training FLOPs over real tokens
            "train_samples_per_second": round(samples / seconds, 3),
            "train_tokens_per_second": round(real / seconds, 1),  # real tokens, padding excluded
            "padding_fraction": round(1 - real / padded, 4) if padded else 0.0,
            "seconds_per_step": round(seconds / self.steps, 4) if self.steps else None,
            "time_to_first_step": round(self.first_step_seconds, 2) if self.first_step_seconds is not None else None,
            "model_tflops_per_second": _significant(achieved),
            "peak_tflops": round(peak, 3) if peak else None,
            # Every process runs on its own device: the peak of the whole run is world size times one device's.
            "mfu": _significant(achieved / (peak * accelerator.num_processes)) if peak else None,
            "peak_memory_gib": round(memory.max().item(), 3),  # the largest of any one process
        }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")
