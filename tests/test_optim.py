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


def tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def train_steps(keep: bool, steps: int = 4):
    """`steps` optimizer steps of a tiny BERT (its own dropout, the same seed) with the embedding gradient kept or not;
    returns the weights after each step."""
    accelerator = Accelerator(cpu=True)
    model = tiny_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    kept = optim.KeptEmbeddingGradient.install(accelerator, model) if keep else None
    assert (kept is not None) == keep
    generator, history = torch.Generator().manual_seed(3), []
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(1, 40, (6, 9), generator=generator)  # a few of 500 rows, different ones each step
        loss = model(input_ids=ids, labels=torch.randint(0, 3, (6,), generator=generator)).loss
        accelerator.backward(loss)
        optim.clip_and_step(accelerator, model, optimizer, 1.0)
        optimizer.zero_grad()
        if kept:
            kept.zero_grad()
        history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return history


def test_the_kept_embedding_gradient_takes_the_same_steps():
    """Guards against: rows used by one step left in the kept gradient for the next (the second step's update would
    carry the first step's gradient: the weights part from step 2 on), or a sparse gradient reaching the optimizer."""
    kept, dense = train_steps(True), train_steps(False)
    for step, (a, b) in enumerate(zip(kept, dense), start=1):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=f"{name} after step {step}")


def test_a_dense_contribution_clears_the_whole_kept_gradient():
    """A weight used elsewhere too (tied) gets a dense gradient that may fill any row: then every row is zeroed."""
    embedding = torch.nn.Embedding(10, 4)
    kept = optim.KeptEmbeddingGradient(embedding)
    (embedding(torch.tensor([1, 2])).sum() + embedding.weight.sum()).backward()
    assert embedding.weight.grad is kept.buffer and kept.buffer.abs().sum() > 0
    kept.zero_grad()
    assert torch.count_nonzero(kept.buffer) == 0
