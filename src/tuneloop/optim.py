"""The optimizer: AdamW and its parameter groups, and the optimizer step with its gradient clipping.

At a small batch (16 headlines of ~12 tokens) a step is mostly passes over the parameters, not model FLOPs
(benchmarks/RESULTS.md, issue 19): the clip reads every gradient for the norm and then writes every gradient scaled,
and AdamW reads them again. Where the optimizer is torch's fused AdamW and no fp16 scaler or sharding engine owns the
gradients, the clip's scaling is handed to the fused kernel instead, through the same `grad_scale` input GradScaler uses
to unscale: the kernel divides each gradient by it as it reads it (and stores it so, as the clip would have). Same
arithmetic as clip-then-step (the gradient times min(max_norm / (norm + 1e-6), 1)), one pass over the gradients fewer.
"""

from __future__ import annotations

import json
import math

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import get_scheduler

from tuneloop.options import SCHEDULERS, TrainArguments

# Engines that own the gradients (sharded, or clipped inside the engine): their own clip and step run unchanged.
ENGINE_OWNED_GRADIENTS = (
    DistributedType.DEEPSPEED,
    DistributedType.FSDP,
    DistributedType.XLA,
    DistributedType.MEGATRON_LM,
)

# The schedulers that cannot run without --lr_scheduler_kwargs, and what they need (an example for errors and --help).
SCHEDULER_KWARGS_NEEDED = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 100},
}
# Keys of --lr_scheduler_kwargs that count optimizer steps: scaled with the warmup and total steps (make_scheduler).
STEP_COUNT_KWARGS = ("num_stable_steps", "num_decay_steps", "timescale")


def make_optimizer(model: torch.nn.Module, t: TrainArguments, device: torch.device) -> torch.optim.AdamW:
    # Biases and LayerNorm weights (the 1-D tensors) get no weight decay, as in BERT and transformers' Trainer.
    # Under DeepSpeed ZeRO-3 the model is created already partitioned: each local tensor is a flat 1-D shard and the
    # true shape is in `ds_shape`, so tensors are classified by that shape (by `ndim` every tensor looked 1-D: the
    # decay group came out empty, DeepSpeed dropped it and the scheduler's first step failed).
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    groups = [
        {"params": [p for p, m in zip(params, matrix) if m], "weight_decay": t.weight_decay},
        {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu", "xpu", "mps")  # the single-kernel AdamW; torch has it on these devices
    return torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=fused
    )


def clip_and_step(
    accelerator: Accelerator, model: torch.nn.Module, optimizer, max_grad_norm: float, fold_clip: bool = True
) -> tuple[torch.Tensor | None, bool]:
    """Clip the gradients to `max_grad_norm` (0: no clipping, the norm is still measured) and step the optimizer.

    Returns the pre-clip gradient norm (None on an accumulation micro-step, where Accelerate makes the step a no-op)
    and whether an fp16 overflow made the step update nothing. `fold_clip=False` forces clip-then-step (the benchmark
    compares the two)."""
    if not accelerator.sync_gradients:
        optimizer.step()
        return None, False
    if fold_clip and clip_folds_into_step(accelerator, optimizer):
        return step_with_folded_clip(optimizer, max_grad_norm), False
    # clip_grad_norm_ returns the pre-clip norm; with clipping off, an infinite bound only measures it.
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    return norm, optimizer_step(accelerator, model, optimizer)


def clip_folds_into_step(accelerator: Accelerator, optimizer) -> bool:
    """Fused AdamW, and nothing else scaling or owning the gradients: the fp16 GradScaler passes its own grad_scale
    (it keeps Accelerate's unscale-clip-step path), and DeepSpeed / FSDP clip sharded gradients themselves."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return (
        accelerator.scaler is None
        and accelerator.distributed_type not in ENGINE_OWNED_GRADIENTS
        and isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
        and bool(inner.defaults.get("fused"))
    )


def step_with_folded_clip(optimizer, max_grad_norm: float) -> torch.Tensor:
    """One AdamW step on the clipped gradients, the clipping done inside the fused kernel: returns the pre-clip norm."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper steps this one
    grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).float()  # the same foreach norms as clip_grad_norm_
    if max_grad_norm:
        # clip_grad_norm_ multiplies by min(max_norm / (norm + 1e-6), 1); the kernel divides by its reciprocal.
        # No host sync: the comparison stays a tensor, as in clip_grad_norm_.
        inner.grad_scale = torch.clamp((norm + 1e-6) / max_grad_norm, min=1.0)
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("grad_scale", None)
    return norm


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer) -> bool:
    """Step the optimizer at a step that syncs gradients (`clip_and_step` takes the accumulation micro-steps). True
    when an fp16 overflow (inf/NaN gradients) made the step update nothing.

    Accelerate infers a skip from GradScaler not calling `optimizer.step()`; fused AdamW takes the scale into its own
    kernel (`_step_supports_amp_scaling`), so step() always runs and the kernel skips inside, and Accelerate never
    reports a skip. The scaler itself knows: it lowers its scale exactly when it found inf/NaN gradients, for any
    optimizer. DeepSpeed runs its own loss scaler, and its engine says whether the last step was applied.
    """
    scaler = accelerator.scaler
    scale = scaler.get_scale() if scaler is not None else None  # a host sync, as GradScaler's own unfused path has
    optimizer.step()
    if scaler is not None:
        return scaler.get_scale() < scale
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return not model.was_step_applied()
    return False


class KeptEmbeddingGradient:
    """The word embedding's gradient kept from step to step, with only the rows a step used zeroed after it.

    The embedding's dense backward allocates a vocabulary-sized zero matrix every step and adds the used rows into it
    (MiniLM: 30,522 x 384, half the model's parameters, 99% of it zeros at 16 headlines; 7-9% of a short step). Here
    the embedding hands autograd its sparse gradient (`sparse=True`) and autograd adds it into this kept dense buffer
    (AccumulateGrad: dense += sparse touches only those rows); after the optimizer step the rows used are set back to
    zero. The optimizer still sees a dense gradient with the same values, so the maths is unchanged; only the fill is
    gone. Single process on a CPU only: under DDP the reducer decides at wrap time whether a gradient is sparse, and on
    a GPU the fill is a few microseconds (and this path is unmeasured there).
    """

    def __init__(self, embedding: torch.nn.Embedding):
        self.weight = embedding.weight
        self.buffer = torch.zeros_like(self.weight)
        self.used_rows: list[torch.Tensor] = []
        self.dense_seen = False  # the weight also used elsewhere (tied): a dense gradient may fill any row
        embedding.sparse = True
        self.weight.grad = self.buffer
        self.weight.register_hook(self._note_rows)  # called with each backward's sparse gradient, before accumulation

    @classmethod
    def install(cls, accelerator: Accelerator, model: torch.nn.Module) -> KeptEmbeddingGradient | None:
        try:
            embedding = accelerator.unwrap_model(model).get_input_embeddings()
        except (AttributeError, NotImplementedError):  # an architecture that does not name its input embedding
            return None
        if (
            accelerator.distributed_type == DistributedType.NO
            and accelerator.device.type == "cpu"
            and isinstance(embedding, torch.nn.Embedding)
            and embedding.weight.requires_grad
            and embedding.max_norm is None
        ):
            return cls(embedding)
        return None

    def _note_rows(self, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            self.used_rows.append(grad._indices()[0])
        else:
            self.dense_seen = True

    def zero_grad(self) -> None:
        """After `optimizer.zero_grad()` (which sets every gradient to None): zero the rows used and hand the buffer
        back as the embedding's gradient."""
        if self.dense_seen:
            self.buffer.zero_()
        elif self.used_rows:
            self.buffer.index_fill_(0, torch.cat(self.used_rows), 0.0)  # a row named twice is zeroed twice: no unique()
        self.used_rows.clear()
        self.dense_seen = False
        self.weight.grad = self.buffer


def make_scheduler(
    name: str, kwargs: dict | None, optimizer, warmup_steps: int, total_steps: int, num_processes: int = 1
):
    """The learning-rate schedule (`transformers.get_scheduler`), for Accelerate's prepared scheduler.

    That one steps once per process per optimizer step (unless split_batches), so every step count is multiplied by
    `num_processes`, as in run_glue_no_trainer.py: warmup, total, and the step counts in `kwargs` (STEP_COUNT_KWARGS).
    """
    scaled = {
        key: value * num_processes if key in STEP_COUNT_KWARGS and value is not None else value
        for key, value in (kwargs or {}).items()
    }
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
        scheduler_specific_kwargs=scaled,
    )


def scheduler_problems(t: TrainArguments) -> list[str]:
    """What is wrong with --lr_scheduler_type and --lr_scheduler_kwargs (config.validate reports it)."""
    if t.lr_scheduler_type not in SCHEDULERS:  # a Config built in code (the parser checks flags and recipes)
        return [f"lr_scheduler_type {t.lr_scheduler_type!r} is not one of {', '.join(SCHEDULERS)}"]
    if not isinstance(t.lr_scheduler_kwargs, (dict, type(None))):
        return [
            f"lr_scheduler_kwargs must be a JSON object, e.g. '{{\"num_cycles\": 2}}' (got {t.lr_scheduler_kwargs!r})"
        ]
    problem = scheduler_problem(t) if t.learning_rate > 0 else None
    return [problem] if problem else []


def scheduler_problem(t: TrainArguments) -> str | None:
    """Build the schedule once on a stand-in optimizer, so that a schedule that cannot run (a missing or misspelt
    lr_scheduler_kwargs) is reported before any data or model is loaded, not after."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.learning_rate)
    try:
        make_scheduler(t.lr_scheduler_type, t.lr_scheduler_kwargs, optimizer, warmup_steps=1, total_steps=100)
    except (TypeError, ValueError) as e:
        needed = SCHEDULER_KWARGS_NEEDED.get(t.lr_scheduler_type)
        return (
            f"lr_scheduler_type {t.lr_scheduler_type} cannot run with lr_scheduler_kwargs {t.lr_scheduler_kwargs} "
            f"({' '.join(str(e).split())})" + (f": e.g. --lr_scheduler_kwargs '{json.dumps(needed)}'" if needed else "")
        )
    return None
