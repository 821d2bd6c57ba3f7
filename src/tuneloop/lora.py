"""LoRA through 🤗 PEFT (`--use_peft`): which modules get adapters, which train in full, and saving the result.

The classifier head is found from the model's own structure, not from a list of names: a transformers
`*ForSequenceClassification` model is its backbone (the child named by `base_model_prefix`: `bert`, `model`,
`deberta`...) plus the head, so the head is every other top-level child that has parameters: `classifier` (BERT,
RoBERTa), `score` (Llama, Qwen2, Mistral), `pre_classifier` + `classifier` (DistilBERT), `pooler` + `classifier`
(DeBERTa-v2), `head` + `classifier` (ModernBERT). Those modules are new, or at least task-specific, so they train in
full (PEFT's `modules_to_save`, which PEFT then leaves without LoRA); "all-linear" covers every linear layer of the
backbone (BERT's pretrained pooler included). PEFT's own guess knows only the names `classifier` and `score`: with it,
DeBERTa's new, randomly initialised pooler got LoRA on frozen random weights instead of training, and DistilBERT
failed ("modules_to_save cannot be applied to modules of type lora.Linear", peft 0.21).

Everything is first tried on the model built on the meta device (no memory, no weights read), so a target that
matches nothing or a head that cannot be found stops the run with one line before the weights load.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

from tuneloop.errors import UserError
from tuneloop.options import ModelArguments

ADAPTER_DIR = "adapter"  # output_dir/adapter: the adapter, beside the merged model in output_dir
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: what makes a folder an adapter folder


def lora_problems(m: ModelArguments) -> list[str]:
    """LoRA options that cannot work; set without --use_peft they would be silently ignored."""
    defaults = ModelArguments()
    names = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_adapter")
    if not m.use_peft:
        changed = [f"--{name}" for name in names if getattr(m, name) != getattr(defaults, name)]
        return [f"{', '.join(changed)} set without --use_peft: add --use_peft (LoRA) or drop them"] if changed else []
    problems = []
    if m.lora_r < 1:
        problems.append(f"lora_r must be >= 1 (got {m.lora_r})")
    if m.lora_alpha <= 0:
        problems.append(f"lora_alpha must be > 0 (got {m.lora_alpha})")
    if not 0 <= m.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1) (got {m.lora_dropout})")
    if "all-linear" in m.lora_target_modules and len(m.lora_target_modules) > 1:
        problems.append("lora_target_modules: 'all-linear' stands alone (or name the modules without it)")
    return problems


def head_modules(model: torch.nn.Module) -> list[str]:
    """The top-level modules of a sequence classifier that are not its backbone and have parameters."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(backbone, torch.nn.Module):
        return []
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and next(child.parameters(), None) is not None
    ]


def lora_config(m: ModelArguments, heads: list[str]):
    from peft import LoraConfig, TaskType

    targets = m.lora_target_modules
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=list(heads),  # (PEFT extends this list with its own guesses: a copy)
    )


def add_adapter(model: torch.nn.Module, m: ModelArguments, low_cpu_mem_usage: bool = False):
    """The model with LoRA adapters on its backbone and its head trainable in full (a `PeftModel`)."""
    from peft import get_peft_model

    heads = head_modules(model)
    if not heads:
        raise UserError(
            f"--use_peft: cannot find the classifier head of {type(model).__name__} (no module besides "
            f"its backbone {getattr(model, 'base_model_prefix', None)!r} has parameters): train it without "
            "--use_peft"
        )
    try:
        return get_peft_model(model, lora_config(m, heads), low_cpu_mem_usage=low_cpu_mem_usage)
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError and its other configuration errors
        raise UserError(
            f"--lora_target_modules {' '.join(m.lora_target_modules)} does not work with "
            f"{type(model).__name__} ({' '.join(str(e).split())[:200]}): name some of its linear layers "
            "(e.g. query value) or use all-linear"
        ) from None


def model_class(config: PretrainedConfig):
    """The transformers classifier class of a config; None for custom code (trust_remote_code)."""
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(config), None)


def check(m: ModelArguments, config: PretrainedConfig) -> None:
    """Before the weights load: LoRA on the model built on the meta device (no memory used, nothing read). The class
    itself, not `from_config`, which would partition the model under ZeRO-3."""
    if model_class(config) is None:  # custom code: checked once loaded, by add_adapter
        return
    with torch.device("meta"):
        add_adapter(model_class(config)(config), m, low_cpu_mem_usage=True)


def describe(model, m: ModelArguments) -> str:
    """The start-up line of a LoRA run: the adapter, the head, trainable / total parameters."""
    # ZeRO-3 creates the model already partitioned: numel() is a shard there, ds_numel the full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    total, trainable = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)
    return (
        f"tuneloop: LoRA r={m.lora_r} alpha={m.lora_alpha} on {' '.join(m.lora_target_modules)}, head trained in "
        f"full: {', '.join(head_modules(model.base_model.model))}; trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )


def save(accelerator, model, tokenizer, output_dir: str, merge: bool, writing) -> None:
    """The final save of a LoRA run. Every process takes part (the state dict is gathered from shards under ZeRO-3).

    merge: the adapter to output_dir/adapter and the merged plain transformers model to output_dir; otherwise the
    adapter to output_dir. An adapter folder also carries the tokenizer and the trained model's config.json (its
    id2label, label2id, pad_token_id), which PEFT does not save: `load_for_inference` builds the base from it.
    """
    from peft import get_peft_model

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective; the full PeftModel state on the main process
    if not accelerator.is_main_process:
        return
    peft_model = accelerator.unwrap_model(model)
    adapter_dir = os.path.join(output_dir, ADAPTER_DIR) if merge else output_dir
    with writing(output_dir, output_dir):
        peft_model.save_pretrained(adapter_dir, state_dict=state_dict)
        tokenizer.save_pretrained(adapter_dir)
        peft_model.base_model.model.config.save_pretrained(adapter_dir)
        if merge:
            # Merged on a copy built on the meta device that takes the gathered tensors as they are (assign=True), so
            # the live model is untouched and, under ZeRO-3, its empty shards are never read. safe_merge writes each
            # merged weight to a new tensor instead of adding into one that may be the live model's.
            config = peft_model.base_model.model.config
            with torch.device("meta"):  # (FSDP2 swaps the live model's class for a subclass of its own)
                copy = (model_class(config) or type(peft_model.base_model.model))(config)
                copy = get_peft_model(copy, peft_model.peft_config["default"], low_cpu_mem_usage=True)
            copy.load_state_dict(state_dict, assign=True, strict=False)
            merged = copy.merge_and_unload(safe_merge=True)
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), ADAPTER_CONFIG))


def base_model_path(adapter_dir: str) -> str:
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        return json.load(f)["base_model_name_or_path"]


def load_for_inference(adapter_dir: str, dtype: str, trust_remote_code: bool):
    """An adapter folder as a model to evaluate or predict with: its base (with the trained config: classes, pad
    token) plus the adapter, merged."""
    from peft import PeftModel

    config = AutoConfig.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_model_path(adapter_dir), config=config, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
