r"""Training memory of a 0.3B decoder classifier: full fine-tuning fp32 against LoRA, bf16 weights and activation
checkpointing, each through tuneloop's own training path, one process per setting.

    python benchmarks/memory.py [--steps 3] [--layers 22] [--only SETTING ...] [--count_only]   # CPU; --steps 2 took
    # 24 minutes on the shared 2-core host under load (RESULTS.md), most of it the full fp32 row

The model is a Llama built from a config (hidden 1024, 22 layers, 16 heads, MLP 2816, vocabulary 32,000: 0.32B
parameters; random weights, saved once, in bf16, with a word-level tokenizer that has no pad token), trained on
random 600-word texts cut to 512 tokens, batch 2, `--steps` optimizer steps: `python train.py ...` in a subprocess per
setting, so every setting starts from an empty process. No launcher: one process, the path `accelerate launch` with
cpu.yaml runs too.

Peak memory: the driver samples the child's /proc/<pid>/status every 10 ms and keeps the largest RssAnon, the
process's private memory (weights, gradients, optimizer state, activations, the allocator's slack). File pages mapped
from the safetensors file and shared libraries are excluded: they belong to the page cache and are the same for every
setting. ru_maxrss from wait4 (all resident pages, files included) is printed beside it. torch has no CPU allocator
statistics (`torch.cuda.max_memory_allocated` exists for GPUs only). `--tune_cpu_allocator false` in every run:
tuneloop's default glibc settings keep freed blocks in the process (faster, but then RSS shows the high-water mark of
the heap, not what the setting needs).

Expected figures come from counting: N parameters x bytes (4 fp32, 2 bf16); gradients and AdamW's two states for the
trainable parameters only (fp32: PEFT keeps LoRA weights in fp32 under a bf16 base); activations from the bytes
autograd saves for backward, measured with saved-tensor hooks on 1- and 2-layer copies of the same model (per layer
x 22 plus what is outside the layers), and under activation checkpointing one hidden state per layer plus one layer's
recomputed activations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(
    hidden_size=1024,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=2816,
    vocab_size=32000,
    max_position_embeddings=1024,
)
SEQ, BATCH, LABELS = 512, 2, 4
# LoRA runs save the adapter only (--merge_adapter false): merging at the end builds merged weights, a memory cost of
# the final save, not of training.
LORA = ["--use_peft", "--merge_adapter", "false"]
SETTINGS = {  # name: tuneloop flags
    "full fp32": [],
    "LoRA + bf16": ["--dtype", "bfloat16", *LORA],
    "LoRA + AC": [*LORA, "--activation_checkpointing"],
    "LoRA + bf16 + AC": ["--dtype", "bfloat16", *LORA, "--activation_checkpointing"],
}
GIB = 2**30


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, pad_token_id=None, **SHAPE)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(SHAPE["vocab_size"] - 3))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=1024, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_inputs(work: Path, layers: int, steps: int) -> tuple[str, dict]:
    import torch
    from transformers import LlamaModel

    model_dir = work / f"llama-{layers}"
    if not (model_dir / "model.safetensors").is_file():
        torch.manual_seed(0)
        LlamaModel(llama_config(layers)).to(torch.bfloat16).save_pretrained(model_dir)
        word_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)

    def rows(n: int) -> str:
        return "".join(
            json.dumps(
                {
                    "text": " ".join(f"w{rng.randrange(SHAPE['vocab_size'] - 3)}" for _ in range(600)),
                    "label": i % LABELS,
                }
            )
            + "\n"
            for i in range(n)
        )

    (work / "train.jsonl").write_text(rows(BATCH * steps))
    (work / "eval.jsonl").write_text(rows(LABELS))
    return str(model_dir), {"train_file": str(work / "train.jsonl"), "validation_file": str(work / "eval.jsonl")}


def saved_bytes(layers: int, lora: bool, dtype) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward of batch x SEQ (each storage counted once)."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = llama_config(layers)
    config.num_labels, config.pad_token_id = LABELS, 2
    model = LlamaForSequenceClassification(config).to(dtype)
    if lora:
        from tuneloop import lora as tl_lora
        from tuneloop.options import ModelArguments

        model = tl_lora.add_adapter(model, ModelArguments(model_name_or_path="-", use_peft=True))
    model.train()
    storages = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter) and not getattr(tensor, "_is_param", False):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=torch.zeros(BATCH, dtype=torch.long))  # the forward is what saves tensors
    return sum(n for ptr, n in storages.items() if ptr not in params)


def expected(layers: int, total: int, trainable: int) -> dict[str, dict[str, float]]:
    """Counted bytes per setting: weights, gradients + AdamW states of what trains, activations."""
    import torch

    act = {}
    for name, lora, dtype in (
        ("full fp32", False, torch.float32),
        ("LoRA fp32", True, torch.float32),
        ("LoRA bf16", True, torch.bfloat16),
    ):
        one, two = saved_bytes(1, lora, dtype), saved_bytes(2, lora, dtype)
        act[name] = (two - one, one - (two - one))  # per layer, outside the layers
    hidden = BATCH * SEQ * SHAPE["hidden_size"]

    def ac(name: str, size: int) -> int:  # inputs kept + one layer recomputed
        return act[name][1] + layers * hidden * size + act[name][0]

    train_state = trainable * (4 + 4 + 8)
    return {
        "full fp32": dict(
            weights=4 * total,
            grads_optimizer=16 * total - 4 * total,
            activations=act["full fp32"][1] + layers * act["full fp32"][0],
        ),
        "LoRA + bf16": dict(
            weights=2 * total,
            grads_optimizer=train_state,
            activations=act["LoRA bf16"][1] + layers * act["LoRA bf16"][0],
        ),
        "LoRA + AC": dict(weights=4 * total, grads_optimizer=train_state, activations=ac("LoRA fp32", 4)),
        "LoRA + bf16 + AC": dict(weights=2 * total, grads_optimizer=train_state, activations=ac("LoRA bf16", 2)),
    }


def run_setting(flags: list[str], model_dir: str, files: dict, steps: int, out: Path) -> dict:
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model_name_or_path",
        model_dir,
        *sum(([f"--{k}", v] for k, v in files.items()), []),
        "--output_dir",
        str(out),
        "--max_length",
        str(SEQ),
        "--per_device_train_batch_size",
        str(BATCH),
        "--per_device_eval_batch_size",
        str(BATCH),
        "--max_steps",
        str(steps),
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--tune_cpu_allocator",
        "false",
        "--seed",
        "0",
        *flags,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = open(out.with_suffix(".log"), "w")
    child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    anon = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
                peak[0] = max(peak[0], anon)
            except (OSError, StopIteration):
                pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    log.close()
    if status:
        raise SystemExit(f"{' '.join(args)} failed: see {out.with_suffix('.log')}")
    results = json.loads((out / "all_results.json").read_text())
    text = out.with_suffix(".log").read_text()
    counts = next((line for line in text.splitlines() if "trainable parameters" in line), "")
    return dict(
        peak_anon=peak[0],
        maxrss=usage.ru_maxrss * 1024,
        wall=time.perf_counter() - started,
        samples_per_second=results.get("train_samples_per_second"),
        counts=counts,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--count_only", action="store_true", help="print the counted figures only")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tuneloop-memory"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, files = (None, None) if args.count_only else make_inputs(work, args.layers, args.steps)
    measured = {}
    for name in [] if args.count_only else args.only or SETTINGS:
        measured[name] = run_setting(
            SETTINGS[name], model_dir, files, args.steps, work / name.replace(" ", "_").replace("+", "")
        )
        m = measured[name]
        print(
            f"{name:18s} peak private {m['peak_anon'] / GIB:6.2f} GiB (ru_maxrss {m['maxrss'] / GIB:5.2f} GiB), "
            f"{m['samples_per_second']} samples/s, {m['wall']:.0f} s  {m['counts']}",
            flush=True,
        )

    total, trainable = parameter_counts(args.layers)
    counted = expected(args.layers, total, trainable)
    full_count = sum(counted["full fp32"].values())
    full = measured.get("full fp32", {}).get("peak_anon")
    print(
        f"\nparameters {total:,}, LoRA trainable {trainable:,}. Counted GiB per setting (weights, gradients + AdamW "
        "states, activations), what each removes from full fine-tuning, and the measured peak private memory:"
    )
    for name in SETTINGS:
        c, m = counted[name], measured.get(name)
        line = (
            f"{name:18s} weights {c['weights'] / GIB:5.2f}  grads+AdamW {c['grads_optimizer'] / GIB:5.2f}  "
            f"activations {c['activations'] / GIB:5.2f}  = {sum(c.values()) / GIB:5.2f} counted, removes "
            f"{(full_count - sum(c.values())) / GIB:5.2f}"
        )
        if m:
            over = (m["peak_anon"] - sum(c.values())) / GIB
            line += f"; measured {m['peak_anon'] / GIB:5.2f} (+{over:.2f} over the count)"
            if full:
                line += f", removes {(full - m['peak_anon']) / GIB:5.2f}, {m['peak_anon'] / full:.3f} of full's peak"
        print(line)


def parameter_counts(layers: int) -> tuple[int, int]:
    """All parameters of the classifier, and those LoRA trains (tuneloop's defaults: r 16 on all-linear, the head)."""
    import torch
    from transformers import LlamaForSequenceClassification

    from tuneloop import lora as tl_lora
    from tuneloop.options import ModelArguments

    config = llama_config(layers)
    config.num_labels = LABELS
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
        total = sum(p.numel() for p in model.parameters())
        model = tl_lora.add_adapter(model, ModelArguments(model_name_or_path="-", use_peft=True))
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    main()
