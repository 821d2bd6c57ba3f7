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
    one = run_in_process(
        tiny_args(tiny_model_dir, toy_files, tmp_path / "one", **{**DDP_RUN, "gradient_accumulation_steps": 4})
    )
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


@pytest.mark.parametrize("ifname, forms", [("lo", True), ("nosuchif0", False)])
def test_the_stop_agreement_group_binds_to_gloo_socket_ifname(ifname, forms):
    """The multi-node script and README tell users to set GLOO_SOCKET_IFNAME beside NCCL_SOCKET_IFNAME: this checks
    that the stop agreement's gloo group (created on GPU runs only) really binds to it. Fakes the device check (a
    'cuda' device passed in) in a 1-process gloo group; a name that is no interface must fail, or the setting is
    ignored and the advice worthless."""
    import os
    import subprocess
    import sys

    code = (
        "import datetime, torch, torch.distributed as dist\n"
        "from tuneloop.preemption import StopRequest\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1, "
        "timeout=datetime.timedelta(seconds=30))\n"
        "StopRequest(2, torch.device('cuda'))\n"
    )
    env = {**os.environ, "GLOO_SOCKET_IFNAME": ifname}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode == 0) == forms, done.stderr[-2000:]
    if not forms:
        assert f"Unable to find address for: {ifname}" in done.stderr
