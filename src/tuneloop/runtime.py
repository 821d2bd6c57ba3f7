"""The process-wide runtime every command shares: the Accelerator, threads and kernels, the padding rule, and printing.

A leaf for the rest of tuneloop: it imports no data, model, metric or report code, so the doctor's probe (which only
needs an Accelerator as training builds it) starts without datasets, scikit-learn or matplotlib.
"""

from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import TorchDynamoPlugin
from tqdm.auto import tqdm

from tuneloop import engines, tracking
from tuneloop.errors import RankFailed
from tuneloop.options import DataArguments, TrainArguments

COMPILE_LENGTH_BUCKET = 64  # tokens; batch lengths are rounded up to this under --torch_compile


CPU_BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of the CPU matrix units that compute in bf16
# Without those units torch emulates bf16 through fp32: measured on this project's AVX2-only 2-core host (2026-11),
# transformers' Trainer on short texts (BBC headlines) ran 5.97 samples/s in bf16 against 76.8 in fp32.
EMULATED_BF16_MEASURED = "13x slower than fp32 on an AVX2-only host: Trainer, short texts, 5.97 vs 76.8 samples/s"


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux); empty where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_has_bf16_units(flags: set[str]) -> bool:
    return any(unit in flags for unit in CPU_BF16_UNITS)


def fast_bf16_available() -> bool:
    """bf16 that runs faster than fp32: tensor cores from Ampere on; AMX or AVX-512 bf16 matrix units on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()[0] >= 8
    return cpu_has_bf16_units(cpu_flags())


def emulated_bf16(mixed_precision: str, device_type: str, flags: set[str] | None = None) -> str | None:
    """What to tell of bf16 on a CPU without bf16 matrix units, where it is emulated and slow; else None.
    (`--mixed_precision auto` never picks bf16 there; this is bf16 asked for by flag, recipe or accelerate config.)"""
    if mixed_precision != "bf16" or device_type != "cpu" or cpu_has_bf16_units(cpu_flags() if flags is None else flags):
        return None
    return (
        f"bf16 on this CPU is emulated (no {' or '.join(CPU_BF16_UNITS)} in its flags): measured "
        f"{EMULATED_BF16_MEASURED}; --mixed_precision no (or auto) trains in fp32"
    )


def make_accelerator(t: TrainArguments) -> Accelerator:
    # With no GPU, Accelerator(cpu=True) is what turns a multi-process launch into real gloo data parallelism;
    # without it each process believes it is alone and trains independently. DeepSpeed is the exception: it sets
    # up its own process group, which on CPU must be told to use gloo.
    no_gpu = not torch.accelerator.is_available()
    deepspeed = engines.requested("DEEPSPEED")
    accelerator = Accelerator(
        cpu=no_gpu and not deepspeed,
        mixed_precision=("bf16" if fast_bf16_available() else "no")
        if t.mixed_precision == "auto"
        else t.mixed_precision,
        # Regional compilation compiles one transformer block and reuses it for the others: a fraction of the compile
        # time of the whole model. Static shapes, because the lengths come in few buckets (see `pad_to_multiple_of`).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True, dynamic=False)
        if t.torch_compile
        else None,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=tracking.log_with(t),
        project_dir=t.output_dir,
        dataloader_config=dataloader_configuration(t.data_seed),
        # The timeout covers the longest wait of one rank for another: rank 0 tokenizing a large dataset while the
        # others wait in main_process_first, or a slow node joining (torch's NCCL default is 10 minutes).
        kwargs_handlers=[
            InitProcessGroupKwargs(
                backend="gloo" if no_gpu and deepspeed else None, timeout=datetime.timedelta(seconds=t.ddp_timeout)
            )
        ],
    )
    engines.reconcile(accelerator, t)  # the engine asked for is the one running, and agrees with the trainer's flags
    return accelerator


def launched_processes() -> int:
    """The process count the launcher started (torchrun's WORLD_SIZE, which `accelerate launch` sets), known before
    any Accelerator exists: an elastic resume must choose the accumulation before building it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def dataloader_configuration(data_seed: int | None = None) -> DataLoaderConfiguration:
    # A seeded sampler makes the data order a function of (seed, epoch) alone: reproducible and resumable. Its seed is
    # --data_seed, or with None the global seed set from --seed.
    # On CUDA the batches come from pinned memory; non_blocking lets their copy to the GPU overlap the step before
    # (built before the Accelerator knows its device, hence the availability check).
    return DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=data_seed, non_blocking=torch.cuda.is_available()
    )


def cpu_cores() -> int:
    """The cores this process may run on (a SLURM or taskset allocation), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def use_all_cpu_cores(accelerator: Accelerator) -> None:
    """Undo `accelerate launch`'s default of one thread per process on CPU.

    Without a CPU accelerate config (`--num_cpu_threads_per_process` unset, OMP_NUM_THREADS not exported), the launcher
    hands its workers OMP_NUM_THREADS=1: the offline default then ran 1.4 s/step instead of 0.77 on 2 cores. Any other
    thread count, set by the user or the launcher, is left alone.
    """
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by `accelerate launch` for every worker
    if accelerator.device.type != "cpu" or not launched or os.environ.get("OMP_NUM_THREADS") != "1":
        return
    threads = cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # this process's share of the cores
    if threads > torch.get_num_threads():
        torch.set_num_threads(threads)
        say(
            accelerator,
            f"tuneloop: {threads} CPU threads per process (accelerate launch passed OMP_NUM_THREADS=1; "
            "set --num_cpu_threads_per_process to choose)",
        )


def set_up_kernels(t: TrainArguments, device: torch.device) -> None:
    """TF32 for fp32 matmuls on a GPU, from --tf32 (default: on from Ampere). Both switches are set either way:
    Accelerate turns matmul TF32 on by itself under torch.compile without mixed precision, which made --tf32 false a
    no-op there."""
    if device.type == "cuda":
        tf32 = t.tf32 if t.tf32 is not None else torch.cuda.get_device_capability(device)[0] >= 8
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def pad_to_multiple_of(d: DataArguments, t: TrainArguments, mixed_precision: str, device: torch.device) -> int | None:
    """The multiple every batch's length is padded to (training, evaluation, prediction alike): 64-token buckets under
    torch.compile (each new shape is a new graph), 8 for fp16/bf16 on a GPU (tensor-core shapes). Not 8 on a CPU:
    11-token headlines padded to 16 did 45% more work there."""
    compile_bucket = min(COMPILE_LENGTH_BUCKET, d.max_length) if t.torch_compile else None
    tensor_cores = mixed_precision in ("fp16", "bf16") and device.type == "cuda"
    return d.pad_to_multiple_of or compile_bucket or (8 if tensor_cores else None)


def agree(accelerator: Accelerator, error: Exception | None, what: str) -> None:
    """Where one process works alone (the main process writing results, a marker, a checkpoint's last files) or any
    process may fail on its own (its part of a checkpoint): every process calls this at the same point with its own
    error, or None. One all-gather; if any process failed, every one raises: the failing ones their own error, the
    others `RankFailed` naming the first that failed. Without it the others would wait in their next collective until
    the process-group timeout (--ddp_timeout, 30 minutes): NCCL does not notice a dead peer, nor does a node whose
    launcher did not start the failed process. (Gloo on one machine notices, with a traceback on every rank.)"""
    failed = [error is not None]
    if accelerator.num_processes > 1:
        flags = torch.tensor([int(error is not None)], device=accelerator.device)
        failed = [bool(flag) for flag in accelerator.gather(flags).tolist()]
    if error is not None:
        error.failed_alone = not all(failed)  # the CLI prints the error of a process that failed alone, any rank's
        raise error
    if any(failed):
        raise RankFailed(f"rank {failed.index(True)} failed while {what} (its own error says why): every rank stops")


def describe(accelerator: Accelerator) -> dict:
    """What actually ran: recorded with every result, so a '2-process' figure is provably from two processes."""
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device.type),
    }


def say(accelerator: Accelerator, message: str) -> None:
    """Print once (main process), above the progress bar rather than through it."""
    if accelerator.is_main_process:
        tqdm.write(message)


def end_together(accelerator: Accelerator) -> None:
    """The last collective of every job that ends on all ranks (finished or stopped by a signal). Every rank's
    collectives done, and gloo's worker threads idle, before the process group is torn down: a 2-process predict
    deadlocked at exit when it went while a worker still held a gathered tensor (the worker waiting for the GIL, the
    main thread joining the worker in ~ProcessGroupGloo), and a 2-process run stopped by SIGUSR1 aborted at exit on
    rank 1 ("terminate called without an active exception") when only the finished path waited. The doctor's probe
    ends the same way."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


class CpuVote:
    """One integer from every rank, reduced (MAX or MIN) the same on each, in a CPU all-reduce over gloo: on GPUs it
    does not wait for the queued kernels, only the ranks meet (they already meet in every gradient all-reduce). GPU
    ranks get their own gloo group: building one is collective, every rank at the same point of the run."""

    def __init__(self, num_processes: int, device: torch.device | None):
        import torch.distributed as dist

        self.processes, self.group = num_processes, None
        if num_processes > 1 and device is not None and device.type != "cpu":
            self.group = dist.new_group(backend="gloo")

    def reduce(self, value: int, op: str) -> int:
        """`value` reduced over the ranks with `op` ("MAX" or "MIN")."""
        if self.processes == 1:
            return value
        import torch.distributed as dist

        flag = torch.tensor([value], dtype=torch.int32)
        dist.all_reduce(flag, op=getattr(dist.ReduceOp, op), group=self.group)
        return int(flag.item())
