"""The CPU dropout kernels (tuneloop/cpu_dropout.py): the same distribution and the same attention maths as torch's."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from tuneloop import cpu_dropout


@pytest.mark.parametrize("size", [100_000, 3_000_000])  # one draw; pieces drawn on threads
def test_keep_mask_is_bernoulli_at_the_rate(size):
    torch.manual_seed(0)
    for p in (0.1, 0.5):
        mask = cpu_dropout.keep_mask((size,), p, torch.device("cpu"))
        assert mask.float().mean().item() == pytest.approx(1 - p, abs=5 * (p * (1 - p) / size) ** 0.5)
        # Neighbouring pieces are not copies of each other (each has its own seed).
        piece = size // cpu_dropout.PIECES
        assert not torch.equal(mask[:piece], mask[piece : 2 * piece])


def test_keep_mask_repeats_with_the_seed_whatever_the_thread_count():
    threads = torch.get_num_threads()
    masks = []
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            torch.manual_seed(7)
            masks.append(cpu_dropout.keep_mask((4, 3, 300, 300), 0.1, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    torch.manual_seed(8)
    assert not torch.equal(cpu_dropout.keep_mask((4, 3, 300, 300), 0.1, torch.device("cpu")), masks[0])


def test_dropout_zeroes_at_the_rate_and_rescales_the_rest():
    layer = cpu_dropout.CPUDropout(0.3).train()
    out = layer(torch.ones(200_000))
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=5e-3)
    assert out.mean().item() == pytest.approx(1.0, abs=1e-2)  # unbiased, as torch's dropout
    assert torch.equal(layer.eval()(out), out)


class Training(torch.nn.Module):
    training = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_sdpas_maths_when_nothing_is_dropped(dtype):
    """A rate too small to drop anything leaves SDPA's own function: outputs and gradients agree, padding masked."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False  # the second sequence's last three tokens are padding
    ours, _ = cpu_dropout.attention(Training(), q, k, v, mask, dropout=1e-12)
    ours.float().square().sum().backward()
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    reference = reference.to(dtype).transpose(1, 2)
    reference.float().square().sum().backward()
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, reference, **tolerance)
    for mine, theirs in zip(ours_grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, theirs, **tolerance)


def test_attention_drops_at_the_rate():
    """With uniform attention over 64 keys of value 1, each output is 1/64 x (kept keys) / (1 - p): mean 1."""
    q, k = torch.zeros(1, 1, 64, 8), torch.zeros(1, 1, 64, 8)
    v = torch.ones(1, 1, 64, 8)
    out, _ = cpu_dropout.attention(Training(), q, k, v, None, dropout=0.25)
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)
    assert out.std().item() > 0.05  # masks differ between rows: something was dropped


def test_install_swaps_dropout_and_attention_but_not_what_is_saved(tmp_path):
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    reference = AutoModelForSequenceClassification.from_config(config)
    reference.load_state_dict(model.state_dict())
    assert cpu_dropout.swap(model) == ["8 dropout layers", "attention"]
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    ids = torch.randint(0, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    with torch.no_grad():  # evaluation goes through transformers' own SDPA: identical logits
        torch.testing.assert_close(
            model.eval()(input_ids=ids, attention_mask=mask).logits,
            reference.eval()(input_ids=ids, attention_mask=mask).logits,
            atol=0,
            rtol=0,
        )
    model.train()(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any("attn" in key for key in saved)  # a plain transformers install loads the fine-tuned model


@pytest.mark.trains
def test_moved_transformers_internals_fall_back_to_the_plain_path(
    monkeypatch, tiny_model_dir, toy_files, tmp_path, capsys
):
    """A transformers release that moves the attention internals cpu_dropout uses must cost speed, never the run:
    install says so in one line and leaves the model on torch's dropout and transformers' SDPA."""
    import sys

    from conftest import run_in_process, tiny_args
    from tuneloop import cpu_speedups

    monkeypatch.setitem(sys.modules, "transformers.integrations.sdpa_attention", None)  # its import now fails
    monkeypatch.delitem(sys.modules, "tuneloop.cpu_dropout")  # imported afresh by install, as in a new process
    monkeypatch.delattr(sys.modules["tuneloop"], "cpu_dropout")
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    (line,) = cpu_speedups.install(model, allocator=False, dropout=True)
    assert line.startswith("tuneloop: --fast_cpu_dropout unavailable") and "sdpa_attention" in line, line
    assert model.config._attn_implementation == "sdpa"
    assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == 8  # untouched
    results = run_in_process(tiny_args(tiny_model_dir, toy_files, tmp_path, num_train_epochs=1))
    assert results["global_step"] == 30 and "--fast_cpu_dropout unavailable" in capsys.readouterr().out


def test_an_allocator_without_mallopt_is_one_line(monkeypatch):
    """Off glibc (musl, macOS) there is no libc.so.6: the run goes on with the default allocator."""
    import ctypes

    from tuneloop import cpu_speedups

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    (line,) = cpu_speedups.install(torch.nn.Linear(2, 2), allocator=True, dropout=False)
    assert "--tune_cpu_allocator unavailable here (OSError" in line


def test_attention_dropout_is_bitwise_the_masked_product():
    """The attention drops with where(), not a product with the mask cast to fp32 (a copy the size of the scores):
    outputs and gradients are bitwise those of probs x mask / (1 - p) with the same mask."""

    def product_form(q, k, v, mask, p):
        scores = (q.float() * q.size(-1) ** -0.5) @ k.float().transpose(-1, -2)
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1) * cpu_dropout.keep_mask(scores.shape, p, scores.device)
        return (probs @ (v.float() * (1 / (1 - p)))).to(q.dtype).transpose(1, 2).contiguous()

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    mask[1, ..., 30:] = False
    results = []
    for attention in (product_form, lambda *a: cpu_dropout.attention(Training(), *a[:4], dropout=a[4])[0]):
        torch.manual_seed(1)  # the same mask
        out = attention(q, k, v, mask, 0.2)
        out.float().square().sum().backward()
        results.append((out.detach(), [t.grad.clone() for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
    (a, a_grads), (b, b_grads) = results
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(a_grads, b_grads))
