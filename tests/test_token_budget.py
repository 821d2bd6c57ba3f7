"""--max_tokens_per_batch (issue 19 item 2): batches cut by a token budget, how Accelerate deals them to the ranks, the
checks on the options, and the loss weighting that keeps a 2-process step the mean over all its samples."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, read_json, saved_state_only, tiny_args
from tuneloop import checkpoint
from tuneloop.batches import TokenBudgetBatchSampler
from tuneloop.config import parse_args
from tuneloop.errors import UserError
from tuneloop.setup import resume_plan


def padded_cost(batch: list[int], lengths: np.ndarray, multiple: int) -> int:
    return int(-(-lengths[batch].max() // multiple) * multiple) * len(batch)


def epochs_of(sampler: TokenBudgetBatchSampler, epochs: int) -> list[list[list[int]]]:
    result = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        result.append(list(sampler))
    return result


@pytest.mark.parametrize("multiple", [1, 8])
def test_every_text_once_per_epoch_within_the_budget(multiple):
    """Guards a lost or repeated text, a batch over the budget (the padded length, not the raw one, is what the
    collator makes), a batch count that changes with the epoch (the plan and the scheduler are sized once), and an
    order that does not change with the epoch or is not a function of (seed, epoch)."""
    lengths = np.random.default_rng(0).integers(3, 40, size=300)  # many equal lengths: ties must mix
    budget = 120
    sampler = TokenBudgetBatchSampler(lengths, budget, seed=5, pad_to_multiple_of=multiple)
    epochs = epochs_of(sampler, 3)
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert max(padded_cost(batch, lengths, multiple) for batch in batches) <= budget
        assert len(batches) == len(sampler)
    assert len({tuple(sorted(Counter(len(b) for b in batches).items())) for batches in epochs}) == 1
    assert epochs[0] != epochs[1] != epochs[2]
    # Not just the batch order: which equal-length texts share a batch changes too.
    assert {frozenset(b) for b in epochs[0]} != {frozenset(b) for b in epochs[1]}
    again = TokenBudgetBatchSampler(lengths, budget, seed=5, pad_to_multiple_of=multiple)
    assert epochs_of(again, 3) == epochs
    assert epochs_of(TokenBudgetBatchSampler(lengths, budget, seed=6, pad_to_multiple_of=multiple), 1)[0] != epochs[0]
    # Greedy: no batch could have taken the next text of the longest-first order (sizes are as large as they fit).
    padded = np.sort(-(-lengths // multiple) * multiple)[::-1]
    start = 0
    for size in sampler.sizes:
        assert padded[start] * size <= budget and (start + size == len(padded) or padded[start] * (size + 1) > budget)
        start += size


def test_padding_multiple_counts_and_an_unfittable_text_is_one_line():
    """Nine-token texts in 32 tokens: 3 a batch unpadded, 2 when the collator pads them to 16. A text longer than the
    budget after padding (the config only checks --max_length) is a UserError naming the fix."""
    assert TokenBudgetBatchSampler([9] * 6, 32, seed=0).sizes == [3, 3]
    assert TokenBudgetBatchSampler([9] * 6, 32, seed=0, pad_to_multiple_of=16).sizes == [2, 2, 2]
    with pytest.raises(UserError, match=r"below the longest text padded to a multiple of 64 \(64 tokens\): raise"):
        TokenBudgetBatchSampler([40, 9], 48, seed=0, pad_to_multiple_of=64)


@pytest.mark.parametrize("world", [1, 2])
def test_accelerate_deals_whole_batches_sets_the_epoch_and_skips_exactly(world):
    """Accelerate's own prepare_data_loader / skip_first_batches (1.15) around the sampler: rank r gets batches r,
    r + N, ... of the epoch's order (BatchSamplerShard with batch_size None keeps their sizes), set_epoch on the
    prepared loader reaches the sampler (through `.batch_sampler.sampler`), and a resumed loader skips exactly this
    rank's first batches. Guards an epoch stuck at 0 under N processes and batches cut or padded by the sharding."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    lengths = np.random.default_rng(1).integers(3, 30, size=61)
    sampler = TokenBudgetBatchSampler(lengths, 64, seed=3)
    expected = epochs_of(TokenBudgetBatchSampler(lengths, 64, seed=3), 2)[1]
    for rank in range(world):
        loader = prepare_data_loader(
            DataLoader(list(range(len(lengths))), batch_sampler=sampler),
            num_processes=world,
            process_index=rank,
            put_on_device=False,
        )
        assert len(loader) == -(-len(sampler) // world)
        loader.set_epoch(1)
        got = [batch.tolist() for batch in loader]
        mine = expected[rank::world]
        assert got[: len(mine)] == mine
        # even_batches: a rank left without a last batch gets the epoch's first batch again (one repeated batch).
        assert got[len(mine) :] == ([expected[0]] if len(got) > len(mine) else [])
        resumed = skip_first_batches(loader, 2)
        resumed.set_epoch(1)
        assert [batch.tolist() for batch in resumed] == got[2:]


def test_bad_combinations_are_one_line_each(tmp_path, tiny_model_dir, toy_files):
    args = tiny_args(tiny_model_dir, toy_files, tmp_path, max_length=32)
    cases = {
        ("--max_tokens_per_batch", "64", "--padding", "max_length"): r"with --padding max_length only counts texts",
        (
            "--max_tokens_per_batch",
            "64",
            "--gradient_accumulation_steps",
            "2",
        ): r"needs gradient_accumulation_steps 1 \(got 2\).*raise --max_tokens_per_batch",
        ("--max_tokens_per_batch", "-1"): r"max_tokens_per_batch must be >= 0",
    }
    for flags, message in cases.items():
        with pytest.raises(UserError, match=message) as info:
            parse_args([*args, *flags])
        assert "\n" not in str(info.value)
    assert parse_args([*args, "--max_tokens_per_batch", "32"]).train.max_tokens_per_batch == 32
    # Below --max_length is allowed (short texts truncated at a generous max_length): the texts themselves must fit.
    assert parse_args([*args, "--max_tokens_per_batch", "16"]).train.max_tokens_per_batch == 16


def test_resume_on_another_process_count_is_refused(tmp_path, tiny_model_dir, toy_files, monkeypatch):
    """Token-budget batches hold varying numbers of samples: no layout of another process count replays a step, so an
    elastic resume is refused (one line, before anything loads); the same count resumes as ever, and a changed budget
    on the same count is another run."""
    out = tmp_path / "run"
    saved = saved_state_only(
        out, step=3, batches_in_epoch=3, num_processes=2, per_device_train_batch_size=8, max_tokens_per_batch=64
    )
    args = tiny_args(tiny_model_dir, toy_files, out, max_tokens_per_batch=64, resume_from_checkpoint="latest")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(
        UserError,
        match=r"written by 2 processes with --max_tokens_per_batch 64, whose batches another "
        r"process count cannot keep: resume on 2 processes",
    ):
        resume_plan(parse_args(args))
    monkeypatch.setenv("WORLD_SIZE", "2")
    _, path, resumed, _ = resume_plan(parse_args(args))
    assert path == str(saved) and resumed.batches_in_epoch == 3 and resumed.max_tokens_per_batch == 64
    with pytest.raises(UserError, match=r"max_tokens_per_batch 64 -> 96"):
        resume_plan(parse_args([*args, "--max_tokens_per_batch", "96"]))


# 40 texts of 7-17 tokens in 10 batches of <= 64 tokens (1 to 7 texts; with seed 0 the first two, rank 0's and rank 1's
# at step 1, hold 7 and 4): 5 steps per epoch on 2 processes, 2 epochs.
# AdamW's first step is lr * g / (|g| + eps), with the usual eps about lr * sign(g) whatever the weighting: eps 1 makes
# the update follow the gradient itself. Clipping is on (the pre-clip norm at step 1 is about 0.3).
BUDGET_RUN = dict(
    max_tokens_per_batch=64,
    max_train_samples=40,
    num_train_epochs=2,
    learning_rate=1e-2,
    adam_epsilon=1.0,
    weight_decay=0.0,
    max_grad_norm=0.1,
    warmup_steps=0,
    logging_steps=1,
    do_eval="false",
    eval_strategy="no",
    save_strategy="steps",
    save_steps=1,
    mixed_precision="no",
)
LOG_SAMPLES = {"TUNELOOP_LOG_SAMPLE_IDS": "1"}


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT with its 3-class head saved: the initial weights are a file the test can load too."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-classifier")
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def budget_run(classifier_dir, toy_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("budget-2proc")
    done = launch(tiny_args(classifier_dir, toy_files, out, **BUDGET_RUN), 2, env=LOG_SAMPLES)
    assert "batches of <= 64 tokens per device" in done.stdout
    results = read_json(out / "all_results.json")
    assert (results["num_processes"], results["distributed_type"]) == (2, "MULTI_CPU")
    return out


def ids_by_step(output_dir: Path) -> list[dict[int, list[list[int]]]]:
    """Per rank: step -> the id lists of its micro-batches."""
    ranks = []
    for rank in range(2):
        steps: dict[int, list[list[int]]] = {}
        for line in (output_dir / "sample_ids" / f"rank_{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).append(entry["ids"])
        ranks.append(steps)
    return ranks


def one_process_step(classifier_dir: str, args: list[str], ranks_ids: list[list[int]]) -> dict:
    """Step 1 computed in this process from the same initial weights on the union of the ranks' texts: the
    gradient of the mean over all samples (and, for contrast, of the mean of the ranks' means), clipped, one AdamW
    step. Returns the updated weights of each and the pre-clip norms."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from tuneloop import data
    from tuneloop import model as models

    config = parse_args(args)
    d, t = config.data, config.train
    splits = data.load_splits(d, t.seed, None, need_train=True)
    tokenizer = models.load_tokenizer(config.model, d.max_length)
    train = data.tokenize(splits.train, splits, tokenizer, d)
    ids = [i for rank in ranks_ids for i in rank]
    batch = DataCollatorWithPadding(tokenizer)([train[i] for i in ids])
    labels = batch.pop("labels")
    out = {}
    for name in ("mean over samples", "mean of rank means"):
        model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
        model.train()
        losses = torch.nn.functional.cross_entropy(model(**batch).logits, labels, reduction="none")
        n0 = len(ranks_ids[0])
        loss = losses.mean() if name == "mean over samples" else (losses[:n0].mean() + losses[n0:].mean()) / 2
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
            weight_decay=0.0,
            fused=True,
        )
        optimizer.step()
        out[name] = ({k: v.detach().clone() for k, v in model.named_parameters()}, norm.item())
    return out


def update_error(initial: dict, expected: dict, got: dict) -> float:
    """|got - expected| / |expected - initial| over all trained weights: the error relative to the step's update."""
    difference = sum(((got[k] - expected[k]).double() ** 2).sum() for k in expected) ** 0.5
    return (difference / sum(((expected[k] - initial[k]).double() ** 2).sum() for k in expected) ** 0.5).item()


@pytest.mark.multiprocess
def test_two_ranks_of_unequal_batches_train_on_the_mean_over_all_samples(budget_run, classifier_dir, toy_files):
    """2 real processes, token-budget batches of different sizes at step 1: the weights after step 1 (its checkpoint)
    equal one process's step on the union of both ranks' texts, loss = mean over all samples, within float noise;
    the unweighted mean of the two ranks' means (DDP's plain average) is far outside that tolerance. Also every text
    once per epoch over both ranks (plus at most even_batches' one repeated batch), and another order in epoch 2
    (the epoch reaches the sampler under 2 processes). Guards the weighting left out or inverted, a global count
    not summed over ranks, and an epoch stuck at 0."""
    ranks = ids_by_step(budget_run)
    first = [ranks[r][1][0] for r in range(2)]
    assert len(first[0]) != len(first[1]), f"the ranks' first batches must differ in size: {first}"

    args = tiny_args(classifier_dir, toy_files, budget_run, **BUDGET_RUN)
    computed = one_process_step(classifier_dir, args, first)
    got = load_file(str(Path(checkpoint.checkpoint_path(str(budget_run), 1)) / "model.safetensors"))
    from transformers import AutoModelForSequenceClassification

    initial = {
        k: v.detach() for k, v in AutoModelForSequenceClassification.from_pretrained(classifier_dir).named_parameters()
    }
    expected, expected_norm = computed["mean over samples"]
    unweighted, unweighted_norm = computed["mean of rank means"]
    got = {k: got[k] for k in expected}
    error, wrong = update_error(initial, expected, got), update_error(initial, expected, unweighted)
    print(
        f"first batches {len(first[0])} + {len(first[1])} texts; error of the run's update {error:.2e}, "
        f"of the mean of means {wrong:.2e}"
    )
    assert error <= 1e-5
    assert wrong >= 100 * 1e-5  # the tolerance tells the two weightings apart
    logged_norm = next(e["train/grad_norm"] for e in read_json(budget_run / "log_history.json") if e["step"] == 1)
    assert logged_norm == pytest.approx(expected_norm, rel=1e-5)
    assert abs(unweighted_norm - expected_norm) > 1e-3 * expected_norm

    steps_per_epoch = read_json(budget_run / "all_results.json")["global_step"] // 2
    for epoch in range(2):
        used = [
            i
            for rank in ranks
            for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
            for batch in rank[step]
            for i in batch
        ]
        assert set(used) == set(range(40)) and len(used) - 40 <= max(
            len(b) for r in ranks for s in r.values() for b in s
        )
    assert ranks[0][1] != ranks[0][steps_per_epoch + 1]


@pytest.mark.multiprocess
def test_resumed_mid_epoch_on_two_processes_is_bitwise_the_same_run(budget_run, classifier_dir, toy_files, tmp_path):
    """The checkpoint of step 2 of epoch 2, resumed on the same 2 processes: the same samples at every later step and
    bitwise the same final weights. Guards skip_first_batches around the sharded batch sampler (a wrong count replays
    or drops batches) and an epoch not set on the resumed loader (epoch 1's order again)."""
    steps_per_epoch = read_json(budget_run / "all_results.json")["global_step"] // 2
    step = steps_per_epoch + 2
    out = tmp_path / "resumed"
    name = Path(checkpoint.checkpoint_path(str(budget_run), step)).name
    shutil.copytree(budget_run / "checkpoints" / name, out / "checkpoints" / name)
    no_saves = {**{k: v for k, v in BUDGET_RUN.items() if k != "save_steps"}, "save_strategy": "no"}
    launch(tiny_args(classifier_dir, toy_files, out, **no_saves, resume_from_checkpoint="latest"), 2, env=LOG_SAMPLES)
    reference, resumed = ids_by_step(budget_run), ids_by_step(out)
    for rank in range(2):
        assert sorted(resumed[rank]) == list(range(step + 1, 2 * steps_per_epoch + 1))
        assert all(resumed[rank][s] == reference[rank][s] for s in resumed[rank])
    final, expected = load_file(str(out / "model.safetensors")), load_file(str(budget_run / "model.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.trains
def test_one_process_run_keeps_the_budget_and_covers_every_text_each_epoch(
    classifier_dir, toy_files, tmp_path, monkeypatch
):
    """One process, in this process, through tuneloop's own set-up (the prepared loader, the plan, the single-process
    optimizer path): every batch within the budget as the collator padded it, every text once per epoch, the planned
    steps per epoch, another order in epoch 2. Guards the batch sampler lost between make_dataloaders and
    `prepare` (batches of --per_device_train_batch_size) and an epoch that does not reach it on one process."""
    from conftest import run_in_process
    from tuneloop import data
    from tuneloop import model as models

    monkeypatch.setenv("TUNELOOP_LOG_SAMPLE_IDS", "1")
    run = {**BUDGET_RUN, "save_strategy": "no", "per_device_train_batch_size": 2}
    del run["save_steps"]
    args = tiny_args(classifier_dir, toy_files, tmp_path, **run)
    results = run_in_process(args)
    config = parse_args(args)
    splits = data.load_splits(config.data, 0, None, need_train=True)
    train = data.tokenize(splits.train, splits, models.load_tokenizer(config.model, 32), config.data)
    lengths = np.array([len(ids) for ids in train["input_ids"]])
    steps: dict[int, list[int]] = {}
    for line in (tmp_path / "sample_ids" / "rank_0.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert entry["step"] not in steps and padded_cost(entry["ids"], lengths, 1) <= 64
        steps[entry["step"]] = entry["ids"]
    per_epoch = len(TokenBudgetBatchSampler(lengths, 64, seed=0))
    assert results["global_step"] == len(steps) == 2 * per_epoch and max(len(b) for b in steps.values()) > 2
    epochs = [[steps[s] for s in range(1 + e * per_epoch, 1 + (e + 1) * per_epoch)] for e in range(2)]
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(40))
    assert epochs[0] != epochs[1]
