"""The distributed engine (DDP, DeepSpeed, FSDP) as the accelerate config chose it, reconciled with the trainer's flags.

The accelerate config picks the engine; the trainer's own flags stay the only source of the numbers that must agree
with the loop: micro batch, gradient accumulation, gradient clipping and precision. Accelerate fills DeepSpeed's "auto"
micro batch from the smallest prepared dataloader (the eval one when it is smaller) and its "auto" clipping with a
constant 1.0 (accelerator.py, `_prepare_deepspeed`), so both are filled here from the trainer's flags before
`prepare`; an explicit value that disagrees is an error, never silently one or the other.

Accumulation, clipping and the optimizer step themselves need nothing here: under DeepSpeed, Accelerate's `backward`
hands the loss to the engine (which scales it by the accumulation steps and, on the last micro-batch, clips, steps and
zeroes the gradients), the prepared optimizer's `step`/`zero_grad` are no-ops and `clip_grad_norm_` only reads the
engine's pre-clip norm. The same loop therefore accumulates and clips exactly once under every engine.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from tuneloop.errors import UserError
from tuneloop.options import TrainArguments


def requested(name: str) -> bool:
    """What `accelerate launch` asked for (it exports ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP to its workers)."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def reconcile(accelerator: Accelerator, t: TrainArguments) -> None:
    """Check that the engine asked for is the one running and agrees with the trainer; fill DeepSpeed's "auto" values.

    Call right after building the Accelerator, before any model is loaded or prepared.
    """
    problems = []
    kind = accelerator.distributed_type
    if requested("FSDP") and kind != DistributedType.FSDP:
        # Accelerate switches to FSDP only for GPU-type process groups (accelerate/state.py, AcceleratorState.__init__);
        # on CPU the same launch silently becomes plain data parallelism. torch's fully_shard itself does run on gloo.
        problems.append(
            f"the accelerate config asks for FSDP but Accelerate set up {kind.value}: Accelerate enables "
            "FSDP only on GPUs; on CPU use accelerate_configs/cpu_2proc.yaml or deepspeed_zero3_cpu.yaml"
        )
    if requested("DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        problems.append(
            f"the accelerate config asks for DeepSpeed but Accelerate set up {kind.value}: "
            "ACCELERATE_USE_CPU=1 in the environment turns DeepSpeed off; unset it"
        )
    if accelerator.gradient_accumulation_steps != t.gradient_accumulation_steps:
        problems.append(
            f"the launcher sets gradient accumulation to {accelerator.gradient_accumulation_steps} "
            f"(accelerate config or --gradient_accumulation_steps of accelerate launch), the trainer to "
            f"{t.gradient_accumulation_steps}: set it only with the trainer's --gradient_accumulation_steps"
        )
    if t.mixed_precision not in (None, "auto") and accelerator.mixed_precision != t.mixed_precision:
        problems.append(
            f"--mixed_precision {t.mixed_precision} but the engine runs {accelerator.mixed_precision}: "
            "remove the precision from the DeepSpeed config file (or set its 'enabled' to \"auto\")"
        )
    if kind == DistributedType.DEEPSPEED:
        problems += fill_deepspeed_config(accelerator, t)
    if problems:
        raise UserError("distributed set-up: " + "; ".join(problems))
    if kind == DistributedType.DEEPSPEED:
        accelerator.print(f"tuneloop: {describe_deepspeed(accelerator)}")


def fill_deepspeed_config(accelerator: Accelerator, t: TrainArguments) -> list[str]:
    """Fill "auto" (or missing) batch, accumulation and clipping from the trainer; return what cannot work."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    problems = []
    from_trainer = {
        "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", t.per_device_train_batch_size),
        "gradient_accumulation_steps": ("gradient_accumulation_steps", t.gradient_accumulation_steps),
        # DeepSpeed's "no clipping" is 0, like the trainer's.
        "gradient_clipping": ("max_grad_norm", t.max_grad_norm),
    }
    for key, (flag, value) in from_trainer.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif float(current) != float(value):
            problems.append(
                f"the DeepSpeed config sets {key}={current} but --{flag} is {value}: "
                f'remove {key} from the DeepSpeed config (or set it to "auto")'
            )
    batch = ds.get("train_batch_size", "auto")
    expected = t.global_batch_size(accelerator.num_processes)
    if batch != "auto" and int(batch) != expected:
        problems.append(
            f"the DeepSpeed config sets train_batch_size={batch} but the trainer's global batch is "
            f'{expected}: set train_batch_size to "auto"'
        )
    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(
                f"the DeepSpeed config has an {section!r} section, but tuneloop builds AdamW and the "
                "learning-rate schedule from its own flags: remove the section"
            )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        problems.append("DeepSpeed cannot train in fp16 on CPU: use mixed_precision bf16 or no")
    gather = plugin.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save", False)
    if t.do_train and plugin.zero_stage == 3 and str(gather).lower() != "true":
        problems.append(
            "ZeRO-3 can save a plain transformers model only by gathering the shards: set "
            "zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save in a DeepSpeed file)"
        )
    return problems


def describe_deepspeed(accelerator: Accelerator) -> str:
    """One line with the DeepSpeed settings the run uses (after `reconcile`), for the start-up summary."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return ""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    offload = [
        f"{what} to {zero[f'offload_{what}']['device']}"
        for what in ("optimizer", "param")
        if zero.get(f"offload_{what}", {}).get("device", "none") not in ("none", None)
    ]
    return (
        f"DeepSpeed ZeRO-{zero.get('stage')}: micro batch {ds['train_micro_batch_size_per_gpu']}, "
        f"accumulation {ds['gradient_accumulation_steps']}, gradient clipping {ds['gradient_clipping']}"
        + (f", offload {' and '.join(offload)}" if offload else "")
    )


def prepare_for_evaluation(accelerator: Accelerator, model, *dataloaders):
    """`accelerator.prepare` for a run that only evaluates or predicts: returns the model, then the dataloaders.

    ZeRO-1/2 and FSDP cannot prepare a model without its optimizer (DeepSpeed's `_configure_zero_optimizer`,
    `Accelerator.prepare`) and gain nothing at inference (ZeRO-1/2 keep full weights; a model trained with FSDP was
    saved whole): the model is only placed on the device in the engine's precision, and the dataloaders prepared.
    ZeRO-3 shards the model as usual (it may not fit one device).
    """
    kind = accelerator.distributed_type
    unsharded = kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage < 3
    )
    if unsharded:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        return (model.to(device=accelerator.device, dtype=dtype), *(accelerator.prepare(dl) for dl in dataloaders))
    if kind == DistributedType.DEEPSPEED:
        return accelerator.prepare(model, *dataloaders)
    # DDP (or one process): the model gets Accelerate's autocast and device placement but no DDP wrapper, which only
    # synchronises gradients. A DDP wrapper freed after `end_training` destroyed the process group also hung a
    # 2-process `tuneloop predict` at exit once (rank 1 joining gloo's threads in ~ProcessGroupGloo).
    return (accelerator.prepare_model(model, evaluation_mode=True), *(accelerator.prepare(dl) for dl in dataloaders))
