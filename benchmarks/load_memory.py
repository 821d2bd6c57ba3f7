r"""Memory at load, per rank: does any rank hold a second full copy of the weights while the model loads?

    python benchmarks/load_memory.py [--hidden 768 --layers 12]   # CPU, 2 processes per engine, about 3 minutes

Builds a BERT from a config (random weights, saved once as safetensors; no download), then for each engine launches
2 processes that build the Accelerator as tuneloop does (`runtime.make_accelerator`) and load the model with
`model.load_model`, the code a training run uses. Each rank samples its own anonymous resident memory (RssAnon, the
process's private memory: file pages mapped from the safetensors file are shared with the page cache and are
excluded) every 5 ms during the load and reports the peak above its level just before, and the parameter bytes it
holds afterwards. Engines: DDP (cpu_2proc.yaml: every rank holds the whole model, the reference), ZeRO-3 with
`zero3_init_flag: true` (deepspeed_zero3_cpu.yaml: each rank should build only its shard) and the same config with
the flag off.

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


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def worker(model_dir: str) -> None:
    """One rank: build the Accelerator and load the model as tuneloop does, sampling memory meanwhile."""
    from tuneloop import model as models, runtime
    from tuneloop.config import ModelArguments, TrainArguments

    accelerator = runtime.make_accelerator(TrainArguments(output_dir=tempfile.mkdtemp()))
    before, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = models.load_model(ModelArguments(model_name_or_path=model_dir), ["a", "b", "c"], pad_token_id=0)
    done.set()
    sampler.join()
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # ZeRO-3: this rank's partition only
    full = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    print("ROW " + json.dumps({"rank": accelerator.process_index, "engine": accelerator.distributed_type.value,
                               "load_peak_anon_mib": round((max(peak[0], rss_anon()) - before) / 2**20),
                               "after_load_anon_mib": round((rss_anon() - before) / 2**20),
                               "held_param_mib": round(held / 2**20), "model_param_mib": round(full / 2**20)}),
          flush=True)
    accelerator.wait_for_everyone()


def make_model(folder: Path, hidden: int, layers: int) -> str:
    import torch
    from transformers import BertConfig, BertModel

    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             intermediate_size=4 * hidden)).save_pretrained(folder)
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
    no_init.write_text((CONFIGS / "deepspeed_zero3_cpu.yaml").read_text().replace("zero3_init_flag: true",
                                                                                   "zero3_init_flag: false"))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for name, config in (("DDP", CONFIGS / "cpu_2proc.yaml"), ("ZeRO-3, zero3_init_flag true",
                                                              CONFIGS / "deepspeed_zero3_cpu.yaml"),
                         ("ZeRO-3, zero3_init_flag false", no_init)):
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                               __file__, "--worker", model_dir], capture_output=True, text=True, env=env, timeout=900)
        rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or len(rows) != 2:
            print(f"{name}: failed ({done.returncode}): {done.stderr[-1500:]}")
            continue
        for row in sorted(rows, key=lambda r: r["rank"]):
            print(f"{name:30s} rank {row['rank']}: load peak +{row['load_peak_anon_mib']} MiB anonymous, "
                  f"+{row['after_load_anon_mib']} MiB after; parameters held {row['held_param_mib']} of "
                  f"{row['model_param_mib']} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
