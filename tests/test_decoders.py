"""Decoder-only classifiers (Llama, Qwen2) and a modern encoder (ModernBERT), end to end on tiny random models.

Each model is built here from a config, with a word-level tokenizer made by the `tokenizers` library and saved beside
it, as a Hub checkpoint is: the decoders' tokenizers have no pad token (tuneloop pads with eos), the Qwen2 one says
padding_side "left" (as decoder tokenizers often do, for generation), and the Llama config names a pad id, 0, that is
not the one the tokenizer will pad with. What is checked is what a user of the saved model sees: a batch scores each
text exactly as it scores alone (the head reads the last real token), and `pipeline` answers with the class names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    ModernBertConfig,
    ModernBertModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
    pipeline,
)

from conftest import FILLER, KEYWORDS, make_rows, run_in_process, tiny_args
from tuneloop import model as models_module
from tuneloop.errors import UserError
from tuneloop.options import ModelArguments

WORDS = [*FILLER, *(w for ws in KEYWORDS.values() for w in ws)]
SIZE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
)
# Texts of different lengths (so a batch pads all but the longest), one with a word outside the vocabulary.
TEXTS = ["the goal", "a new chip was said to be in the year of the robot", "song", "people at the match zebra"]


def word_tokenizer(specials: list[str], template: str | None = None, **tokens) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the toy task's words; `template` adds special tokens around a text."""
    vocab = {word: i for i, word in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        used = [t for t in specials if t in template]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, pair=template.replace("$A", "$A $B:1"), special_tokens=[(t, vocab[t]) for t in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=128, **tokens)


def byte_bpe_tokenizer(**tokens) -> PreTrainedTokenizerFast:
    """A byte-level BPE, as Qwen2's is, trained on the toy task's texts. (transformers 5's AutoTokenizer loads a
    qwen2 folder as Qwen2Tokenizer, which rebuilds a BPE from the saved vocabulary and merges: a word-level
    tokenizer would come back as one that maps every word to one id.)"""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[tokens["eos_token"]], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([row["text"] for row in make_rows(300, seed=0)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=128, **tokens)


def build(out: Path, tokenizer: PreTrainedTokenizerFast, model) -> str:
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("decoders")
    torch.manual_seed(0)
    llama_tok = word_tokenizer(["<unk>", "<s>", "</s>"], "<s> $A", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    qwen_tok = byte_bpe_tokenizer(eos_token="<|endoftext|>", padding_side="left")
    bert_tok = word_tokenizer(
        ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"],
        "[CLS] $A [SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    return {
        # pad_token_id 0 is <unk>, a real token: the head must not be left looking for it.
        "llama": build(
            out / "llama",
            llama_tok,
            LlamaModel(
                LlamaConfig(
                    vocab_size=len(llama_tok),
                    num_key_value_heads=1,
                    bos_token_id=1,
                    eos_token_id=2,
                    pad_token_id=0,
                    **SIZE,
                )
            ),
        ),
        "qwen2": build(
            out / "qwen2",
            qwen_tok,
            Qwen2Model(
                Qwen2Config(
                    vocab_size=len(qwen_tok),
                    num_key_value_heads=1,
                    eos_token_id=qwen_tok.eos_token_id,
                    bos_token_id=None,
                    pad_token_id=None,
                    **SIZE,
                )
            ),
        ),
        "modernbert": build(
            out / "modernbert",
            bert_tok,
            ModernBertModel(
                ModernBertConfig(
                    vocab_size=len(bert_tok),
                    local_attention=16,
                    pad_token_id=1,
                    cls_token_id=2,
                    sep_token_id=3,
                    bos_token_id=2,
                    eos_token_id=3,
                    **SIZE,
                )
            ),
        ),
    }


def batch_and_single_logits(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the texts padded into one batch, and of each text alone (no padding at all)."""
    with torch.no_grad():
        batch = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        single = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in texts])
    return batch, single


@pytest.mark.trains
@pytest.mark.parametrize("name", ["llama", "qwen2", "modernbert"])
def test_classifier_trains_saves_and_reloads_into_pipeline(name, model_dirs, toy_files, tmp_path):
    """Guards: a decoder that cannot pad (no pad token), a head that pools a pad or the wrong token (config
    pad_token_id None or not the tokenizer's: a padded text then scores differently from the same text alone), a saved
    tokenizer left padding, and a saved model that `pipeline` cannot load or answers with LABEL_i."""
    results = run_in_process(tiny_args(model_dirs[name], toy_files, tmp_path, num_train_epochs=2))
    assert results["eval_accuracy"] > 0.5, results  # 3 balanced classes: chance is 1/3 (2 epochs reach 0.67-0.87)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    if name != "modernbert":
        assert tokenizer.pad_token == tokenizer.eos_token
    padded = tokenizer(TEXTS, padding=True)["attention_mask"]
    assert sum(map(sum, padded)) < len(padded) * len(padded[0])  # the batch really is padded
    batch, single = batch_and_single_logits(model, tokenizer, TEXTS)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)

    names = sorted(KEYWORDS)
    assert model.config.id2label == dict(enumerate(names))
    classify = pipeline("text-classification", model=str(tmp_path), device="cpu")
    answers = classify(TEXTS, batch_size=len(TEXTS))
    assert [a["label"] for a in answers] == [names[i] for i in single.argmax(-1).tolist()]
    # What it learnt, through the pipeline: fresh texts of the task, each named by its keyword's topic.
    fresh = make_rows(30, seed=7)
    answers = classify([row["text"] for row in fresh], batch_size=8)
    assert sum(a["label"] == row["label"] for a, row in zip(answers, fresh)) > 15  # chance: 10


def test_left_padding_tokenizer_pads_right_so_absolute_positions_stay(tmp_path):
    """A GPT-2 (absolute position embeddings) whose tokenizer is saved left-padding, loaded the way a run loads it.
    Guards tuneloop keeping left padding: the short texts' tokens would sit at shifted positions, and a batch would
    score them differently from each text alone (measured: logits off by about 0.17 on this model)."""
    tokenizer = word_tokenizer(
        ["<unk>", "<|endoftext|>"], unk_token="<unk>", eos_token="<|endoftext|>", padding_side="left"
    )
    torch.manual_seed(0)
    path = build(
        tmp_path,
        tokenizer,
        GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)),
    )
    m = ModelArguments(model_name_or_path=path)
    loaded = models_module.load_tokenizer(m, max_length=64)
    assert (loaded.padding_side, loaded.pad_token) == ("right", "<|endoftext|>")
    model = models_module.load_model(m, ["a", "b", "c"], loaded.pad_token_id).eval()
    collate = DataCollatorWithPadding(loaded)  # what tuneloop's dataloaders pad with
    with torch.no_grad():
        batch = model(**collate([loaded(text) for text in TEXTS])).logits
        single = torch.cat([model(**loaded([text], return_tensors="pt")).logits for text in TEXTS])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)


def test_tokenizer_with_no_pad_and_no_eos_token_is_one_line(tmp_path):
    """Guards a traceback from the data collator, mid-run, for a tokenizer that gives padding nothing to use."""
    word_tokenizer(["<unk>"], unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="neither a pad nor an eos token"):
        models_module.load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)), max_length=64)
