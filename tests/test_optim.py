"""The optimizer step with the clip folded into fused AdamW's `grad_scale` must take the step clip-then-step takes."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from tuneloop import optim


def prepared(fused: bool = True, scaler: bool = False):
    accelerator = Accelerator(cpu=True)
    if scaler:
        accelerator.scaler = torch.amp.GradScaler("cpu")  # as Accelerate builds it for fp16 on CUDA
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, fused=fused)
    return accelerator, *accelerator.prepare(model, optimizer)


def two_steps(fold: bool, max_grad_norm: float, loss_scale: float):
    """Two optimizer steps on a fixed batch; returns the weights, the reported norms and the gradients left behind."""
    accelerator, model, optimizer = prepared()
    inputs, norms = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), []
    for _ in range(2):
        accelerator.backward(model(inputs).pow(2).mean() * loss_scale)
        norm, skipped = optim.clip_and_step(accelerator, model, optimizer, max_grad_norm, fold_clip=fold)
        assert skipped is False
        norms.append(norm)
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.zero_grad()
    inner = optimizer.optimizer
    assert "grad_scale" not in inner.__dict__, "the fold must not leave a grad_scale behind for the next step"
    return [p.detach().clone() for p in model.parameters()], norms, grads


@pytest.mark.parametrize("loss_scale", [1e-3, 1e3], ids=["norm below max: no clipping", "norm above max: clipped"])
def test_folded_clip_takes_the_step_of_clip_then_step(loss_scale):
    """Guards against: the kernel ignoring grad_scale (the clipped run's weights would move by the unclipped update,
    1e6 times too far: far outside the tolerance), a wrong reciprocal, or the norm reported after clipping."""
    max_grad_norm = 1.0
    folded, folded_norms, folded_grads = two_steps(True, max_grad_norm, loss_scale)
    plain, plain_norms, plain_grads = two_steps(False, max_grad_norm, loss_scale)
    for a, b in zip(folded_norms, plain_norms):
        assert torch.equal(a, b), "the pre-clip norm is the same number"
    clipped = plain_norms[0] > max_grad_norm
    assert bool(clipped) == (loss_scale > 1)
    for a, b in zip(folded, plain):
        if clipped:  # g / (1 / c) against g * c: the last bit may differ
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # the scale is exactly 1: bitwise the same step
            assert torch.equal(a, b)
    # Both leave the clipped gradients behind (the fused kernel stores each gradient as it scaled it, as after
    # GradScaler's unscaling): anything reading .grad after the step sees the same.
    if clipped:
        for grads in (folded_grads, plain_grads):
            assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(max_grad_norm, rel=1e-5)


def test_clipping_off_measures_the_norm_and_steps_unscaled():
    folded, norms, _ = two_steps(True, 0.0, 1e3)
    plain, plain_norms, _ = two_steps(False, 0.0, 1e3)
    assert norms[0] > 1 and torch.equal(norms[0], plain_norms[0])
    assert all(torch.equal(a, b) for a, b in zip(folded, plain))


def test_the_fold_is_only_taken_where_nothing_else_scales_the_gradients():
    """The fp16 GradScaler passes its own grad_scale (and unscales for the clip), and the non-fused AdamW has no
    grad_scale input (its step asserts there is none): both keep Accelerate's clip-then-step."""
    accelerator, _, optimizer = prepared()
    assert optim.clip_folds_into_step(accelerator, optimizer)
    accelerator, _, optimizer = prepared(scaler=True)
    assert not optim.clip_folds_into_step(accelerator, optimizer)
    accelerator, model, optimizer = prepared(fused=False)
    assert not optim.clip_folds_into_step(accelerator, optimizer)
    accelerator.backward(model(torch.ones(2, 8)).sum())
    norm, skipped = optim.clip_and_step(accelerator, model, optimizer, 1.0)  # the plain path runs
    assert norm > 0 and skipped is False
