"""MLflow helpers. Default store: `sqlite:///<store_root>/mlflow.db`, artifacts in
`<store_root>/mlartifacts` — works offline, needs no server, and is what MLflow 3 recommends
(its file store `./mlruns` is in maintenance mode and refuses to start without
MLFLOW_ALLOW_FILE_STORE). See the store with `mlflow ui --backend-store-uri sqlite:///…/mlflow.db`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

MAX_PARAM_LENGTH = 6000


def default_tracking_uri(store_root: str | Path) -> str:
    return f"sqlite:///{Path(store_root).resolve() / 'mlflow.db'}"


def default_artifact_root(store_root: str | Path) -> str:
    return (Path(store_root).resolve() / "mlartifacts").as_uri()


def resolve_tracking(experiment) -> tuple[str, str, str | None]:
    """(tracking_uri, experiment_name, artifact_location for a new experiment) of an `Experiment`."""
    tracking = experiment.tracking
    name = tracking.experiment_name or experiment.name
    if tracking.mlflow_tracking_uri:
        return tracking.mlflow_tracking_uri, name, None
    root = experiment.store_root
    root.mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(root), name, default_artifact_root(root)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict → {"a.b.c": str(value)} (lists as JSON) for `log_params`."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            if isinstance(value, (list, tuple, dict)):
                text = json.dumps(value, sort_keys=True, default=str)
            else:
                text = str(value)
            out[name] = text[:MAX_PARAM_LENGTH]
    return out


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Created concurrently by another run.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class MlflowRun:
    """One MLflow run driven through `MlflowClient` (no global active-run state, so it nests
    safely inside other code that uses `mlflow.start_run`)."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None, run_id: str | None = None):
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        import mlflow
        from mlflow import MlflowClient

        self._mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment_name, artifact_location)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={k: str(v) for k, v in (tags or {}).items()})
            self.run_id = run.info.run_id
        self._finished = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()
                 if v is not None and _is_number(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if not self._finished:
            self.client.set_terminated(self.run_id, status=status)
            self._finished = True


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
