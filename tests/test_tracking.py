"""MLflow: what a training run leaves in the local store, read back with MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train_helpers import lora_run
from trainer.core.config import experiment_from_dict
from trainer.training.tracking import default_tracking_uri, flatten, resolve_tracking


def test_flatten_nested_params():
    flat = flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None", "f": "{}"}


def test_default_store_is_sqlite_under_store_root(tmp_path):
    exp = experiment_from_dict({"name": "x", "store": "st"}, base_dir=tmp_path)
    uri, name, artifacts = resolve_tracking(exp)
    assert uri == default_tracking_uri(tmp_path / "st") == f"sqlite:///{(tmp_path / 'st').resolve()}/mlflow.db"
    assert name == "x" and artifacts == (tmp_path / "st" / "mlartifacts").resolve().as_uri()
    exp = experiment_from_dict({"name": "x", "tracking": {"mlflow_tracking_uri": "http://h:5000",
                                                          "experiment_name": "grp"}}, base_dir=tmp_path)
    assert resolve_tracking(exp) == ("http://h:5000", "grp", None)


@pytest.mark.slow
def test_training_run_contents(tmp_path_factory):
    from mlflow import MlflowClient

    spec, summary = lora_run(tmp_path_factory)
    store = Path(spec["experiment"]["store"])
    assert summary.mlflow_tracking_uri == default_tracking_uri(store)
    client = MlflowClient(summary.mlflow_tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "t"

    # Params: the whole resolved experiment, flattened.
    params = run.data.params
    assert params["name"] == "t"
    assert params["training.learning_rate"] == "0.01"
    assert params["training.lora.r"] == "4"
    assert params["model.builtin_config.hidden_size"] == "32"
    assert params["spec.train_shards"] == spec["train_shards"]
    # Tags: the spec's tags.
    assert run.data.tags["dagster_run_id"] == "run-42"
    assert run.data.tags["data_version"] == "dv-7"
    assert run.data.tags["adapter_version"] == "ad-1"

    # Metrics: per-step history.
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3, 4]
    for name in ("learning_rate", "grad_norm", "tokens_per_second", "trainable_tokens", "eval_loss"):
        assert client.get_metric_history(run.info.run_id, name), name
    trainable = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "trainable_tokens"),
                                         key=lambda m: (m.step, m.timestamp))]
    assert trainable == sorted(trainable) and trainable[-1] == summary.trainable_tokens
    # Held-out answers are scored by the evaluation asset (its own MLflow metrics), not by the training.
    assert not {"accuracy_before", "accuracy_after"} & run.data.metrics.keys()

    # Artifacts: sample-generation tables at each evaluation and at the end, the adapter, the summary.
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "adapter", "training_summary.json"} <= top
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_000002.json", "samples/step_000004.json", "samples/final.json"} <= samples
    local = Path(client.download_artifacts(run.info.run_id, "samples/final.json", str(tmp_path_factory.mktemp("dl"))))
    table = json.loads(local.read_text())
    assert set(table["columns"]) >= {"prompt", "generation", "reference"}
    assert len(table["data"]) == 2
    adapter = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= adapter
    # The artifacts live under the store root, next to the database.
    assert run.info.artifact_uri.startswith((store / "mlartifacts").resolve().as_uri())
