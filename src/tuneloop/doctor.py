"""`python -m tuneloop.doctor [--config_file accelerate_configs/X.yaml] [--num_processes N]`: can this machine run it?

Three steps, each printed as it runs:
1. the environment: versions, CPU cores, memory, GPUs;
2. the accelerate config checked against this machine without starting anything (GPU count, precision, engine,
   settings tuneloop refuses), then a real launch of a probe with that config: every process builds tuneloop's own
   Accelerator, takes two optimizer steps on a tiny BERT (built from a config: no download) and gathers its rank, so
   the distributed type, process count and precision printed are the ones a training run would get;
3. Accelerate's own `accelerate test` on the config, retried once (it is flaky on CPU), both outcomes printed.
Exit status 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata

import torch

from tuneloop.errors import OneLineArgumentErrors, is_main_launched_process
from tuneloop.runtime import cpu_cores, emulated_bf16

PROBE_TAG = "tuneloop-doctor-probe:"
PACKAGES = ("tuneloop", "torch", "transformers", "accelerate", "deepspeed", "datasets", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = OptionParser(prog="tuneloop doctor", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config_file", help="accelerate config to check (default: Accelerate's default config, if any)"
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        metavar="N",
        help="check, probe and test with N processes in all instead of the config's num_processes, "
        "as `accelerate launch --num_processes N` would run",
    )
    parser.add_argument("--skip_accelerate_test", action="store_true", help="do not run `accelerate test`")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # what each launched process runs
    args = parser.parse_args(argv)
    if args.probe:
        return probe()

    print_environment()
    from accelerate.commands.config.config_args import default_config_file

    path = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if path is None:
        print("\nno accelerate config given and no default one (`accelerate config`): pass --config_file")
        return 0
    print(f"\naccelerate config {path}" + (f" with --num_processes {args.num_processes}" if args.num_processes else ""))
    config, problems, warnings = check_config(path, args.num_processes)
    for line in describe_config(config):
        print(f"  {line}")
    for warning in warnings:
        print(f"  warning: {warning}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    if problems:
        print("not launched: fix the problems above first")
        return 1
    ok = run_probe(path, config, args.num_processes)
    if not args.skip_accelerate_test and config.num_machines > 1:
        print("\naccelerate test: skipped for a multi-machine config (it would wait for the other machines)")
    elif not args.skip_accelerate_test:
        ok = run_accelerate_test(path, config, args.num_processes) and ok
    print("\ndoctor: all checks passed" if ok else "\ndoctor: some checks FAILED (see above)")
    return 0 if ok else 1


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_has_bf16() -> bool:
    """bf16 in hardware (compute capability 8.0 on). torch's default also counts emulation, which says yes on V100
    and T4: bf16 there runs, far slower than fp16, so a bf16 config on those cards must be flagged."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def print_environment() -> None:
    print("environment")
    print(f"  python {platform.python_version()} on {platform.platform()}")
    for name in PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {name} {version}")
    print(f"  CPU cores available: {cpu_cores()}, memory: {total_memory_gib():.0f} GiB")
    if gpu_count():
        print(f"  CUDA {torch.version.cuda}, {gpu_count()} GPU(s), bf16 {'yes' if gpu_has_bf16() else 'no'}")
        for i in range(gpu_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"    cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        print("  GPUs: none (CPU only)")


def total_memory_gib() -> float:
    import psutil  # an Accelerate dependency

    return psutil.virtual_memory().total / 2**30


def check_config(path: str, num_processes: int | None = None):
    """Static checks of an accelerate config against this machine, with `num_processes` (all machines together)
    instead of the config's when given. Returns (config, problems, warnings)."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(path)
    except Exception as e:  # a missing file, bad YAML, unknown keys: Accelerate's own parser decides
        return None, [f"cannot read {path}: {' '.join(str(e).split())[:300]}"], []
    if num_processes:
        config.num_processes = num_processes
    problems, warnings = [], []
    kind = kind_of(config)
    use_cpu = bool(getattr(config, "use_cpu", False))
    n_gpu, n_proc = gpu_count(), getattr(config, "num_processes", 1)
    machines = getattr(config, "num_machines", 1) or 1
    precision = str(config.mixed_precision or "no")
    ds = getattr(config, "deepspeed_config", {}) or {}
    wants_gpu = not use_cpu and kind not in ("MULTI_CPU", "XLA")

    if getattr(config, "compute_environment", "LOCAL_MACHINE") not in ("LOCAL_MACHINE", None):
        warnings.append(f"compute_environment {config.compute_environment}: only LOCAL_MACHINE is checked here")
    if wants_gpu and n_gpu == 0 and kind != "FSDP":  # FSDP gets its own explanation below
        problems.append(
            f"{kind} with use_cpu: false needs GPUs and this machine has none: on CPU use "
            "accelerate_configs/cpu.yaml, cpu_2proc.yaml or deepspeed_zero*_cpu.yaml"
        )
    elif wants_gpu and n_proc // machines > n_gpu:
        problems.append(
            f"{n_proc // machines} processes per machine but this machine has {n_gpu} GPU(s): set "
            f"num_processes to {n_gpu * machines} in the config, or pass --num_processes {n_gpu * machines} "
            "to both the doctor and `accelerate launch`"
        )
    if wants_gpu and n_gpu and precision == "bf16" and not gpu_has_bf16():
        problems.append(
            f"mixed_precision bf16 but {torch.cuda.get_device_name(0)} has no bf16 units (compute "
            "capability below 8.0: torch would only emulate it, slowly): use fp16 (--mixed_precision fp16)"
        )
    if not wants_gpu:
        cores = cpu_cores()
        if n_proc > cores:
            warnings.append(f"{n_proc} CPU processes on {cores} cores: they will compete for cores")
        if precision == "fp16":
            (problems if kind == "DEEPSPEED" else warnings).append(
                "fp16 on CPU: DeepSpeed cannot train in it and Accelerate runs it in fp32; use bf16"
            )
        if emulated := emulated_bf16(precision, "cpu"):  # as bf16 on a GPU without bf16 units, above
            problems.append(f"mixed_precision bf16 but {emulated}")
    if kind == "MULTI_CPU":
        warnings.append(
            "distributed_type MULTI_CPU makes `accelerate launch` start ONE process (it is meant for "
            "MPI/oneCCL launches); for N CPU processes use MULTI_GPU with use_cpu: true, like cpu_2proc.yaml"
        )
    if kind == "FSDP" and n_gpu == 0:
        problems.append(
            "FSDP needs GPUs: Accelerate switches to FSDP only for GPU process groups, on CPU the run "
            "would silently be plain data parallelism (tuneloop refuses it)"
        )
    wrap = (getattr(config, "fsdp_config", None) or {}).get("fsdp_transformer_layer_cls_to_wrap")
    if kind == "FSDP" and wrap:
        warnings.append(
            f"fsdp_transformer_layer_cls_to_wrap {wrap}: every model trained with this config must have "
            "that class (leave the key out to wrap each model's own layers, its `_no_split_modules`); "
            "the probe's tiny BERT is wrapped by its own layers instead"
        )
    if kind == "DEEPSPEED":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            problems.append("DeepSpeed is not installed: pip install deepspeed")
        for key, flag in (
            ("gradient_accumulation_steps", "--gradient_accumulation_steps"),
            ("gradient_clipping", "--max_grad_norm"),
        ):
            if key in ds:
                warnings.append(
                    f"deepspeed_config sets {key}: tuneloop takes it from {flag} and stops if they differ; "
                    "remove it from the config"
                )
        file = ds.get("deepspeed_config_file")
        if file and not os.path.isfile(file):
            problems.append(f"deepspeed_config_file {file!r} does not exist")
        if int(ds.get("zero_stage", 2) or 2) == 3 and not file and not ds.get("zero3_save_16bit_model", False):
            problems.append(
                "ZeRO-3 without zero3_save_16bit_model: true cannot save a plain transformers model "
                "(tuneloop refuses to train with it)"
            )
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            problems.append(
                "ACCELERATE_USE_CPU is set in this environment: Accelerate then ignores DeepSpeed; unset it"
            )
        if machines > 1 and ds.get("deepspeed_multinode_launcher", "pdsh") != "standard":
            warnings.append(
                "several machines with DeepSpeed's pdsh launcher (needs ssh between nodes); for one "
                "`accelerate launch` per node (SLURM) set deepspeed_multinode_launcher: standard"
            )
    if machines > 1:
        warnings.append(
            f"{machines} machines: each runs its own `accelerate launch` with --machine_rank and "
            "--main_process_ip (the SLURM scripts pass them); the probe below runs this machine's share "
            "alone, and `accelerate test` (which cannot be told so) is skipped"
        )
    return config, problems, warnings


def kind_of(config) -> str:
    kind = config.distributed_type
    return str(kind.value if hasattr(kind, "value") else kind)


def describe_config(config) -> list[str]:
    if config is None:
        return []
    lines = [
        f"distributed_type {kind_of(config)}, num_processes {config.num_processes}, "
        f"num_machines {config.num_machines}, mixed_precision {config.mixed_precision}, "
        f"use_cpu {getattr(config, 'use_cpu', False)}"
    ]
    for section in ("deepspeed_config", "fsdp_config"):
        values = getattr(config, section, None)
        if values:
            lines.append(f"{section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return lines


def launch_env() -> dict:
    """`accelerate test` calls `accelerate-launch` through PATH: put this interpreter's scripts first."""
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def run_probe(path: str, config, num_processes: int | None = None) -> bool:
    """Launch the probe with the config (and --num_processes, if given) and report what every process really got."""
    # A multi-machine config would wait for the other machines: run this machine's share as a one-machine launch.
    if config.num_machines > 1:
        flags = [
            "--num_machines",
            "1",
            "--machine_rank",
            "0",
            "--num_processes",
            str(config.num_processes // config.num_machines),
        ]
    else:
        flags = ["--num_processes", str(num_processes)] if num_processes else []
    print("\nprobe: accelerate launch --config_file", path, *flags, "-m tuneloop.doctor --probe")
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            os.path.abspath(path),
            *flags,
            "-m",
            "tuneloop.doctor",
            "--probe",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=launch_env(), cwd=workdir)
    lines = [line for line in result.stdout.splitlines() if line.startswith(PROBE_TAG)]
    if result.returncode != 0 or not lines:
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "tuneloop: error:" in line]
        print(f"  FAILED (exit status {result.returncode}): {errors[0] if errors else ''}")
        if not errors:
            print("  " + "\n  ".join(result.stderr.strip().splitlines()[-15:]))
        return False
    seen = json.loads(lines[-1][len(PROBE_TAG) :])
    expected = config.num_processes // config.num_machines
    if seen["num_processes"] != expected:  # e.g. MULTI_CPU, which starts one process whatever num_processes says
        print(
            f"  FAILED: the config asks for {expected} processes, the run got {seen['num_processes']} "
            f"({seen['distributed_type']})"
        )
        return False
    print(
        f"  ok: {seen['distributed_type']} x{seen['num_processes']} on {seen['device']}, mixed_precision "
        f"{seen['mixed_precision']}, ranks {seen['ranks']} answered, {seen['steps']} optimizer steps"
        + (f"; {seen['engine']}" if seen.get("engine") else "")
    )
    return True


def probe_model() -> torch.nn.Module:
    """A 2-layer, 32-wide BERT classifier built from a config (no download). FSDP shards a model by its transformer
    layers (its `_no_split_modules`), so the probe needs a model that has some; every engine probes the same one."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=2,
        )
    )


def probe() -> int:
    """Runs in every launched process: tuneloop's Accelerator, two optimizer steps, a gather of the ranks."""
    from tuneloop.engines import describe_deepspeed
    from tuneloop.errors import UserError
    from tuneloop.options import TrainArguments
    from tuneloop.runtime import end_together, make_accelerator

    # A layer class named in an FSDP config is the user's model's (the main process warned about it); the probe's
    # BERT is wrapped by its own layers. Accelerate reads the name from here when it builds its FSDP plugin.
    os.environ.pop("FSDP_TRANSFORMER_CLS_TO_WRAP", None)
    with tempfile.TemporaryDirectory() as output_dir:
        t = TrainArguments(output_dir=output_dir, per_device_train_batch_size=4)
        try:
            accelerator = make_accelerator(t)
        except UserError as e:
            if is_main_launched_process():
                print(f"tuneloop: error: {e}", file=sys.stderr)
            return 2
        torch.manual_seed(0)
        model = probe_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        examples = 8 * accelerator.num_processes * 2
        data = torch.utils.data.TensorDataset(torch.randint(0, 64, (examples, 8)), torch.randint(0, 2, (examples,)))
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        steps = 0
        for input_ids, labels in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=input_ids, labels=labels).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            steps += accelerator.sync_gradients
        ranks = accelerator.gather(torch.tensor([accelerator.process_index], device=accelerator.device)).tolist()
        if sorted(ranks) != list(range(accelerator.num_processes)):
            raise RuntimeError(f"gathered ranks {ranks}, expected 0..{accelerator.num_processes - 1}")
        if accelerator.is_main_process:
            seen = {
                "distributed_type": accelerator.distributed_type.value,
                "num_processes": accelerator.num_processes,
                "device": accelerator.device.type,
                "mixed_precision": accelerator.mixed_precision,
                "ranks": sorted(ranks),
                "steps": steps,
                "engine": describe_deepspeed(accelerator),
            }
            print(PROBE_TAG + json.dumps(seen), flush=True)
        end_together(accelerator)
    return 0


def run_accelerate_test(path: str, config, num_processes: int | None = None) -> bool:
    """Accelerate's own end-to-end check of the config, retried once; both outcomes are printed."""
    if num_processes:  # `accelerate test` takes only a config file: give it a copy with that process count
        with tempfile.TemporaryDirectory() as workdir:
            return run_accelerate_test(with_num_processes(path, num_processes, workdir), config)
    kind = kind_of(config)
    env = launch_env()
    if gpu_count() == 0 and kind == "DEEPSPEED":
        # Its script builds a plain Accelerator(): with no GPU and no backend given, Accelerate's PartialState treats
        # the run as "no backend == no distributed training" (accelerate/state.py) and counts every DeepSpeed rank as
        # process 0 of 1, so its gather checks fail. The probe above passed the gloo backend, as tuneloop does.
        print(
            "\naccelerate test: skipped, it cannot run DeepSpeed without a GPU (its script gives no gloo backend, so "
            "Accelerate counts each rank as process 0 of 1); the probe above checked this config instead"
        )
        return True
    if gpu_count() == 0 and getattr(config, "use_cpu", False) and int(config.num_processes or 1) > 1:
        # Without it, the script's Accelerator() sees no GPU and no cpu=True: each process would test alone.
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "test", "--config_file", path]
    print("\naccelerate test --config_file", path, "(with ACCELERATE_USE_CPU=1)" if "ACCELERATE_USE_CPU" in env else "")
    for attempt in (1, 2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        if result.returncode == 0 and "Test is a success" in result.stdout:
            print(f"  passed (attempt {attempt})")
            return True
        tail = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-3:]
        print(f"  attempt {attempt} FAILED (exit status {result.returncode}): " + " | ".join(tail)[:600])
    return False


def with_num_processes(path: str, num_processes: int, folder: str) -> str:
    """A copy of the accelerate config at `path`, in `folder`, with num_processes replaced."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f)
    values["num_processes"] = num_processes
    copy = os.path.join(folder, os.path.basename(path))
    with open(copy, "w") as f:
        yaml.safe_dump(values, f)
    return copy


class OptionParser(OneLineArgumentErrors, argparse.ArgumentParser):
    """A mistyped option is one line naming the closest ones, as in every tuneloop command."""


if __name__ == "__main__":
    from tuneloop.cli import exit_process, run_command

    exit_process(run_command(main, None))
