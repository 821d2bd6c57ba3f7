"""One attention layer with dropout, forward and backward, as tuneloop's CPU kernels run it against the same maths
written as a product with the mask (what it did before issue 19); alternating in one process, medians.

    .venv/bin/python benchmarks/attention_dropout.py 16 12 448 32 6     # batch, heads, length, head size, rounds
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tuneloop import cpu_dropout  # noqa: E402


class Training(torch.nn.Module):
    training = True


def product_form(q, k, v, mask, p):
    scores = (q.float() * q.size(-1) ** -0.5) @ k.float().transpose(-1, -2)
    scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1) * cpu_dropout.keep_mask(scores.shape, p, scores.device)  # bool mask -> fp32 copy
    return (probs @ (v.float() * (1 / (1 - p)))).to(q.dtype).transpose(1, 2).contiguous()


def tuneloop_form(q, k, v, mask, p):
    return cpu_dropout.attention(Training(), q, k, v, mask, dropout=p)[0]


def main() -> None:
    batch, heads, length, size, rounds = (
        int(x) for x in (sys.argv[1:6] if len(sys.argv) > 5 else (16, 12, 448, 32, 6))
    )
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, size, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
    mask[0, ..., -length // 8 :] = False  # some padding
    forms = {"product with the mask": product_form, "tuneloop (where)": tuneloop_form}
    results, times = [], {name: [] for name in forms}
    for form in forms.values():  # the same mask: bitwise the same outputs and gradients
        torch.manual_seed(1)
        out = form(q, k, v, mask, 0.1)
        out.float().square().sum().backward()
        results.append([out.detach().clone()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    print("bitwise the same outputs and gradients:", all(torch.equal(a, b) for a, b in zip(*results)))
    for i in range(rounds):
        for name in forms if i % 2 else reversed(list(forms)):
            start = time.perf_counter()
            forms[name](q, k, v, mask, 0.1).float().square().sum().backward()
            times[name].append(time.perf_counter() - start)
            for t in (q, k, v):
                t.grad = None
    for name, seconds in times.items():
        print(
            f"{name}: {1000 * statistics.median(seconds):.1f} ms (median of {rounds}), forward + backward, "
            f"{batch} x {heads} x {length} x {size}"
        )


if __name__ == "__main__":
    main()
