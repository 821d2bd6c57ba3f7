"""What a run leaves on disk: the fine-tuned model and tokenizer, its metrics and its resolved config.

Every write happens on the main process only; every process takes part in gathering the state dict, which is what
makes the save work when the model is sharded (DeepSpeed ZeRO-3, FSDP).
"""

from __future__ import annotations

import json
import os
import tempfile

from accelerate import Accelerator

from tuneloop.config import Config
from tuneloop.errors import UserError

RESULTS_FILE = "all_results.json"
CONFIG_FILE = "run_config.json"
HISTORY_FILE = "log_history.json"


def check_writable(output_dir: str) -> None:
    """Fail before training, not after it, when the output folder cannot be written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(f"output_dir {output_dir!r} is not writable ({e.strerror}): pick another --output_dir") from None


def save_final_model(accelerator: Accelerator, model, tokenizer, output_dir: str) -> None:
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective: gathers shards to the main process
    accelerator.unwrap_model(model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)


def save_results(accelerator: Accelerator, config: Config, results: dict, history: list | None = None) -> None:
    if not accelerator.is_main_process:
        return
    out = config.train.output_dir
    _write_json(os.path.join(out, RESULTS_FILE), results)
    _write_json(os.path.join(out, CONFIG_FILE), config.to_dict())
    if history is not None:
        _write_json(os.path.join(out, HISTORY_FILE), history)


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")
