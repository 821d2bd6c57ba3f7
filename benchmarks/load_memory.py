r"""Memory at load, per rank: does any rank hold a second full copy of the weights while the model loads?

    python benchmarks/load_memory.py [--hidden 768 --layers 12]   # CPU, 2 processes per engine, about 3 minutes

Builds a BERT from a config (random weights, saved once as safetensors; no download), then for each engine launches
2 processes that build the Accelerator as tuneloop does (`runtime.make_accelerator`) and load the model with
`model.load_model`, the code a training run uses. Each rank samples its own resident memory every 5 ms during the
load (/proc/self/smaps_rollup: RSS; PSS, which counts a page shared by both ranks half to each, so a file both map
is one copy between them; anonymous, private memory) and reports the peak and the level after, above the level just
before, and the parameter bytes it holds afterwards. transformers 5 maps the safetensors file and reads pages on first
use, so every tensor the rank holds is read once before the level "after" is taken. Engines: DDP (cpu_2proc.yaml:
every rank holds the whole model, the reference), ZeRO-3 with `zero3_init_flag: true` (deepspeed_zero3_cpu.yaml:
each rank should build only its shard) and the same config with the flag off.

FSDP's `cpu_ram_efficient_loading` cannot be measured here: Accelerate enables FSDP only on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"


def memory() -> dict[str, int]:
    """This process's resident memory in bytes: `rss` (what `top` shows), `anon` (private memory) and `pss` (shared
    pages divided among the processes sharing them: two ranks mapping the same safetensors file count half each)."""
    with open("/proc/self/smaps_rollup") as f:
        fields = {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in f
            if line.split(":")[0] in ("Rss", "Pss", "Anonymous")
        }
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Anonymous"]}


def worker(model_dir: str) -> None:
    """One rank: build the Accelerator and load the model as tuneloop does, sampling memory meanwhile."""
    from tuneloop import model as models
    from tuneloop import runtime
    from tuneloop.options import ModelArguments, TrainArguments

    accelerator = runtime.make_accelerator(TrainArguments(output_dir=tempfile.mkdtemp()))
    before, done = memory(), threading.Event()
    peak = dict(before)

    def sample():
        while not done.is_set():
            for key, value in memory().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = models.load_model(ModelArguments(model_name_or_path=model_dir), ["a", "b", "c"], pad_token_id=0)
    # transformers 5 maps the safetensors file and reads a page only when it is first used: touch every tensor this rank
    # holds, as the first forward (or DDP's broadcast of rank 0's weights) would.
    for p in model.parameters():
        getattr(p, "ds_tensor", p).sum()
    done.set()
    sampler.join()
    after = memory()
    # ZeRO-3 partitions each parameter: the local tensor is empty and this rank's shard is in `ds_tensor`.
    held = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    mib = lambda count: round(count / 2**20)  # noqa: E731
    print(
        "ROW "
        + json.dumps(
            {
                "rank": accelerator.process_index,
                "engine": accelerator.distributed_type.value,
                **{f"peak_{k}_mib": mib(max(peak[k], after[k]) - before[k]) for k in before},
                **{f"after_{k}_mib": mib(after[k] - before[k]) for k in before},
                "held_param_mib": mib(held),
                "model_param_mib": mib(full),
            }
        ),
        flush=True,
    )
    accelerator.wait_for_everyone()


def make_model(folder: Path, hidden: int, layers: int) -> str:
    import torch
    from transformers import BertConfig, BertModel

    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        BertModel(
            BertConfig(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=hidden // 64,
                intermediate_size=4 * hidden,
            )
        ).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tuneloop-load-memory"))
    args = parser.parse_args()
    work = Path(args.workdir)
    model_dir = make_model(work / f"bert-{args.hidden}x{args.layers}", args.hidden, args.layers)
    no_init = work / "deepspeed_zero3_cpu_no_init.yaml"
    no_init.write_text(
        (CONFIGS / "deepspeed_zero3_cpu.yaml").read_text().replace("zero3_init_flag: true", "zero3_init_flag: false")
    )
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for name, config in (
        ("DDP", CONFIGS / "cpu_2proc.yaml"),
        ("ZeRO-3, zero3_init_flag true", CONFIGS / "deepspeed_zero3_cpu.yaml"),
        ("ZeRO-3, zero3_init_flag false", no_init),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(config),
                __file__,
                "--worker",
                model_dir,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or len(rows) != 2:
            print(f"{name}: failed ({done.returncode}): {done.stderr[-1500:]}")
            continue
        for row in sorted(rows, key=lambda r: r["rank"]):
            print(
                f"{name:30s} rank {row['rank']}: during load, peak +{row['peak_pss_mib']} MiB PSS "
                f"(+{row['peak_rss_mib']} RSS, +{row['peak_anon_mib']} anonymous); after, +{row['after_pss_mib']} PSS "
                f"(+{row['after_rss_mib']} RSS, +{row['after_anon_mib']} anonymous); parameters held "
                f"{row['held_param_mib']} of {row['model_param_mib']} MiB"
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
