"""Where a training run's news goes: the log always; Dagster Pipes and MLflow when installed.

Only rank 0 reports. Neither back-end is required: the training entry point runs where only
torch, transformers, peft, accelerate and pyarrow are installed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from trainer.core.config import Experiment
from trainer.core.schemas import TRAINING_SUMMARY
from trainer.training.output import RUN_ID_FILE
from trainer.training.spec import TrainingSpec

log = logging.getLogger("sftdag.train")


class Reporter:
    """Log lines (and Dagster Pipes log lines and the materialization, when launched through
    Pipes). A context manager: leaving it closes Pipes with the exception, if any."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.pipes = None
        if not is_main or not os.environ.get("DAGSTER_PIPES_CONTEXT"):
            return
        try:
            from dagster_pipes import open_dagster_pipes
        except ImportError:
            log.warning("DAGSTER_PIPES_CONTEXT is set but dagster_pipes is not installed: not reporting to Dagster")
            return
        self.pipes = open_dagster_pipes()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pipes is not None:
            self.pipes.__exit__(*exc_info)
            self.pipes = None

    def info(self, msg: str, *args: Any) -> None:
        self._emit("info", msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._emit("warning", msg, *args)

    def _emit(self, level: str, msg: str, *args: Any) -> None:
        if not self.is_main:
            return
        text = msg % args if args else msg
        getattr(log, level)(text)
        if self.pipes is not None:
            try:
                getattr(self.pipes.log, level)(text)
            except Exception as e:  # pragma: no cover - never fail training over a log line
                log.warning("pipes log failed: %s", e)

    def materialization(self, metadata: dict[str, Any], data_version: str | None) -> None:
        if self.pipes is None:
            return
        try:
            self.pipes.report_asset_materialization(metadata=metadata, data_version=data_version)
        except Exception as e:  # e.g. launched by an op with no asset in scope
            self.warning("could not report the materialization to Dagster: %s", e)


def open_mlflow_run(spec: TrainingSpec, work: Path, reporter: Reporter):
    """The MLflow run of this training: a new one, or the one a resumed run started (its id is
    kept in the work directory). None when mlflow is not installed or unreachable."""
    try:
        import mlflow  # noqa: F401

        from trainer.training.tracking import MlflowRun, flatten, resolve_tracking
    except ImportError:
        reporter.warning("mlflow is not installed: not tracking this run")
        return None
    try:
        experiment = spec.experiment
        uri, name, artifact_location = resolve_tracking(experiment)
        run_id_path = work / RUN_ID_FILE
        run_id = run_id_path.read_text().strip() if run_id_path.exists() else None
        tags = {**spec.tags, "sftdag.output_dir": str(spec.output_dir)}
        run = MlflowRun(uri, name, artifact_location, run_name=spec.output_dir.name, tags=tags, run_id=run_id)
        if run_id is None:
            run_id_path.write_text(run.run_id)
        else:
            run.set_tags(tags)
            reporter.info("continuing MLflow run %s", run.run_id)
        params = flatten(experiment.to_dict())
        params["base_dir"] = experiment.base_dir
        for key in ("train_shards", "eval_shards", "tokenizer_dir", "held_out", "output_dir"):
            params[f"spec.{key}"] = str(getattr(spec, key))
        run.log_params(params)
        reporter.info("MLflow: run %s in experiment %r at %s", run.run_id, name, uri)
        return run
    except Exception as e:  # tracking must never stop training
        reporter.warning("MLflow unavailable (%s): not tracking this run", e)
        return None


def close_mlflow_run_of(work: Path, experiment: Experiment, reporter: Reporter) -> None:
    """A run killed after its summary was written left its MLflow run open: close it."""
    run_id_path = work / RUN_ID_FILE
    if not run_id_path.exists():
        return
    try:
        from trainer.training.tracking import MlflowRun, resolve_tracking

        uri, name, artifact_location = resolve_tracking(experiment)
        run = MlflowRun(uri, name, artifact_location, run_id=run_id_path.read_text().strip())
        run.log_artifact(work / TRAINING_SUMMARY)
        run.end("FINISHED")
    except Exception as e:  # tracking must never stop the completion
        reporter.warning("could not close the MLflow run of %s: %s", work, e)
