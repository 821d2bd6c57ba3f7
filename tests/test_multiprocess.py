"""Real 2-process runs: `accelerate launch` with accelerate_configs/cpu_2proc.yaml, gloo on this CPU.

Each run records the world size it actually had in all_results.json, and the tests assert it: equal metrics alone
would not prove two processes (two independent single-process runs give equal metrics too). Evaluation on 2
processes (45 examples, the last batch evened out by repetition) is checked where the commands are:
test_predict.py (`tuneloop evaluate` and `predict` on 2 processes) and test_engines.py (every engine).
"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import DDP_RUN, read_json, run_in_process, tiny_args

pytestmark = pytest.mark.multiprocess


def test_two_ranks_equal_one_rank_with_accumulation(ddp_run, tiny_model_dir, toy_files, tmp_path):
    """2 ranks x batch 8 x accumulation 2 make the same optimizer steps as 1 rank x batch 8 x accumulation 4 (same data
    order, same clipping of the averaged gradient, the same short last step of each epoch). Guards gradients that are
    not averaged across ranks, a schedule sized for one rank, and a data order that depends on the process count."""
    one = run_in_process(tiny_args(tiny_model_dir, toy_files, tmp_path / "one",
                                   **{**DDP_RUN, "gradient_accumulation_steps": 4}))
    two = read_json(ddp_run / "all_results.json")
    assert (two["num_processes"], two["distributed_type"]) == (2, "MULTI_CPU")
    assert two["global_step"] == one["global_step"] == 4 * 8  # 30 batches per epoch / 4 per step, rounded up
    # The scheduler reaches its planned end on 2 ranks (Accelerate steps it once per process per optimizer step).
    assert two["final_learning_rate"] == pytest.approx(0.0, abs=1e-12)
    history_one = read_json(tmp_path / "one" / "log_history.json")
    history_two = read_json(ddp_run / "log_history.json")
    lr_one = [h["train/learning_rate"] for h in history_one if "train/learning_rate" in h]
    lr_two = [h["train/learning_rate"] for h in history_two if "train/learning_rate" in h]
    assert lr_two == pytest.approx(lr_one)
    loss_one = [h["train/loss"] for h in history_one if "train/loss" in h]
    loss_two = [h["train/loss"] for h in history_two if "train/loss" in h]
    assert loss_two == pytest.approx(loss_one, rel=1e-3)
    weights_one = load_file(tmp_path / "one" / "model.safetensors")
    weights_two = load_file(ddp_run / "model.safetensors")
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-3, atol=1e-4, msg=name)
    assert two["eval_accuracy"] == one["eval_accuracy"]
