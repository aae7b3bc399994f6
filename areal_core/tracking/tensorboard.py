"""TensorBoard event files under ``<output_dir>/tensorboard/`` (or ``tracking.tensorboard_dir``)."""

from __future__ import annotations

from pathlib import Path

import yaml


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, run_config: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events a previous process wrote past its checkpoint
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step or None)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(run_config, sort_keys=False) + "```",
                             global_step=first_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a reader (or a crash) sees every finished step

    def close(self) -> None:
        self.writer.close()
