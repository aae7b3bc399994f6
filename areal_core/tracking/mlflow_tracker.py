"""MLflow: a tracking server, or a local store: by default ``sqlite:///<output_dir>/mlflow.db``
with artifacts under ``<output_dir>/mlartifacts`` (MLflow 3 refuses new ``file:`` stores)."""

from __future__ import annotations

import time


class MlflowTracker:
    name = "mlflow"

    def __init__(self, settings, tracking_uri: str, run_name: str, run_id: str | None, run_config: dict,
                 artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(settings.experiment_name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(settings.experiment_name,
                                                               artifact_location=artifact_location))
            run_id = self.client.create_run(experiment_id, run_name=settings.run_name or run_name).info.run_id
            self.client.log_dict(run_id, run_config, "config.yaml")
        else:  # a resumed run continues its MLflow run
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
