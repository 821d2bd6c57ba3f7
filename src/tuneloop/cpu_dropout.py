"""Dropout for CPU training at the model's own rates, without torch's two slow CPU paths.

Measured on this 2-core CPU (one MiniLM attention layer, 16 x 12 heads x 448 tokens, bf16 autocast, forward and
backward, allocator set up): SDPA 532 ms, this module's attention 322 ms, the same fp32 arithmetic.
- torch's CPU dropout draws every mask element as a 64-bit Bernoulli sample, one at a time: 5.2 ns per element, 1.6 s
  of a 4 s step on BBC articles. A 31-bit uniform integer per element compared with p * 2**31 is the same Bernoulli
  draw (the rate exact to 2**-31, finer than torch's own float draw), and large masks are drawn in pieces on every
  core: 1.8 ns per element, a third of the cost.
- With attention dropout > 0, SDPA leaves its fused CPU kernel for the math path: it upcasts to fp32, rescales the
  batch x heads x L x L probabilities, and runs a "safe" softmax (isneginf, all, where: three more passes over them).
  `attention` below does the same fp32 maths with the dropout's 1 / (1 - p) applied to the values, which are
  L / head_dim times smaller, and no extra passes. Everywhere else (eval, no dropout, GPU) it is transformers' own SDPA.
The random stream differs from torch's dropout (it is seeded from torch's global generator, so runs stay reproducible
and resume exactly); the distribution of every mask does not.

This module reaches into transformers' attention registry and SDPA function: import it only through
`cpu_speedups.install`, which falls back to the plain path when a transformers release has moved them.
"""

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "tuneloop_cpu_sdpa"


# Large masks are drawn in this many pieces, each from its own generator seeded by one draw of the global one (so
# seeded runs repeat and resume exactly), on a thread per core: torch's CPU samplers run on one core. A fixed count,
# so the random stream does not depend on the number of threads.
PIECES = 32
PARALLEL_FROM = 1 << 20  # elements; below this the threads cost more than they save
_thread_pools: dict[int, ThreadPoolExecutor] = {}  # by thread count


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True with probability 1 - p, independently per element: int32 `random_()` is uniform on [0, 2**31)."""
    threshold = round(p * 2**31)
    if device.type != "cpu" or math.prod(shape) < PARALLEL_FROM:
        return torch.empty(shape, dtype=torch.int32, device=device).random_() >= threshold
    keep = torch.empty(shape, dtype=torch.bool)
    pieces, seeds = keep.view(-1).tensor_split(PIECES), torch.randint(2**62, (PIECES,)).tolist()

    def draw(i: int) -> None:
        generator = torch.Generator().manual_seed(seeds[i])
        torch.ge(torch.empty(pieces[i].shape, dtype=torch.int32).random_(generator=generator), threshold, out=pieces[i])

    threads = torch.get_num_threads()
    if threads not in _thread_pools:
        _thread_pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tuneloop-dropout")
    list(_thread_pools[threads].map(draw, range(PIECES)))
    return keep


class CPUDropout(torch.nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x.shape, self.p, x.device) * (1 / (1 - self.p))


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: (batch, heads, length, head_dim) in, (batch, length, heads,
    head_dim) out."""
    if not (module.training and dropout > 0 and query.device.type == "cpu"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = (query.float() * scaling) @ key.float().transpose(-1, -2)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # True = attend
        scores = scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    # where(), not a product with the mask: a bool mask times fp32 probabilities is first copied to an fp32 mask the
    # size of the scores (and that copy is what the backward keeps): 18% of a long step was such copies.
    probs = torch.where(keep_mask(scores.shape, dropout, scores.device), scores.softmax(-1), 0.0)
    output = probs @ (value.float() * (1 / (1 - dropout)))
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def swap(model: torch.nn.Module) -> list[str]:
    """Swap the model's dropout for the CPU versions in place; returns what was swapped, for the log line.

    Only plain `nn.Dropout` modules and models on transformers' SDPA attention interface are touched; the weights and
    the saved config are not (the attention choice is not written to config.json)."""
    # The transformers internals first: if they have moved, this raises before the model is touched.
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA gets: boolean, or None without padding
    swapped = []
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(ATTENTION)
        swapped.append("attention")
    dropouts = [
        (parent, name, child.p)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Dropout and child.p > 0
    ]
    for parent, name, p in dropouts:
        setattr(parent, name, CPUDropout(p))
    return ([f"{len(dropouts)} dropout layers"] if dropouts else []) + swapped
