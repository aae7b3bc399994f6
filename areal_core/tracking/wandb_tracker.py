"""Weights & Biases: offline (a run directory under ``<dir>/wandb/``, to ``wandb sync`` later),
online (the user's key from ``WANDB_API_KEY``, read by wandb itself, never by us) or disabled."""

from __future__ import annotations

from pathlib import Path


class WandbTracker:
    name = "wandb"

    def __init__(self, settings, directory: Path, run_name: str, run_id: str, run_config: dict):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        # the same id after a resume: online, the run continues; offline, its files join one run
        self.run = wandb.init(project=settings.project, name=settings.name or run_name, dir=str(directory),
                              mode=settings.mode, id=run_id, resume="allow", config=run_config,
                              reinit="create_new", settings=wandb.Settings(console="off", silent=True))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before wandb's service has flushed the run's file; its teardown waits
        # for that (seen: an offline run file still 7 bytes long just after finish())
        wandb.teardown()
