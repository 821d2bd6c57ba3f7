"""Experiment trackers through Accelerate (`log_with` + `init_trackers`): wandb, TensorBoard, both or none.

TensorBoard writes event files under `output_dir/<project>`; wandb writes under `output_dir/wandb` and needs an
account, or `WANDB_MODE=offline` for a local run that `wandb sync` can upload later.
"""

from __future__ import annotations

import os

from accelerate import Accelerator

from tuneloop.errors import UserError
from tuneloop.options import Config, TrainArguments

TRACKERS = {"none": [], "wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"]}


def log_with(t: TrainArguments) -> list[str] | None:
    """The trackers of --report_to (a list: `--report_to wandb tensorboard`), for Accelerator(log_with=...)."""
    return sorted({tracker for name in t.report_to for tracker in TRACKERS[name]}) or None


def start(accelerator: Accelerator, config: Config, run_id: str) -> None:
    """Open the trackers. `run_id` is kept in every checkpoint, so a resumed run continues the same wandb run;
    TensorBoard continues by writing to the same directory."""
    t = config.train
    if not log_with(t):
        return
    try:
        accelerator.init_trackers(
            t.project,
            config=flat_hparams(config),
            init_kwargs={"wandb": {"name": run_name(t), "dir": t.output_dir, "id": run_id, "resume": "allow"}},
        )
    except Exception as e:
        if "wandb" in type(e).__module__ or "api_key" in str(e).lower():
            raise UserError(
                f"wandb could not start ({' '.join(str(e).split())[:200]}): run `wandb login`, or set "
                "WANDB_MODE=offline for a local run"
            ) from None
        raise


def run_name(t: TrainArguments) -> str:
    """--run_name, or the output folder's name: what the tracker run and the model card are called."""
    return t.run_name or os.path.basename(os.path.normpath(t.output_dir))


def flat_hparams(config: Config) -> dict:
    """One flat dict of scalars: TensorBoard's hparams accept only int/float/str/bool. Paths without the home
    directory (Config.to_shareable_dict): the event files live in output_dir, and wandb uploads its config."""
    flat = {}
    for section in config.to_shareable_dict().values():
        for key, value in section.items():
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
