"""The deployment examples in pipelines/deploy/ load as Dagster loads them (no server, no cluster):
Dagster's instance schema, then each configured class's own config schema."""

import importlib
import re
import shutil

import pytest
import yaml

from trainer.core.config import load_experiment

from .conftest import REPO

DEPLOY = REPO / "pipelines" / "deploy"
RUN_LIMIT_TAGS = {"sftdag/gpu", "sftdag/loop"}


def load_instance_config(path, tmp_path, monkeypatch) -> dict:
    """{section: processed config} of a dagster.yaml, each section through its class's config schema,
    as `DagsterInstance` does before building the class."""
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.instance.ref import InstanceRef

    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://user:secret@db.example:5432/dagster")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(path, home / "dagster.yaml")
    raw, _ = dagster_instance_config(str(home))  # raises on any key the instance schema lacks
    ref = InstanceRef.from_dir(str(home))
    sections = {"storage": ref.storage_data, "run_coordinator": ref.run_coordinator_data,
                "run_launcher": ref.run_launcher_data}
    loaded = {"raw": raw}
    for name, data in sections.items():
        klass = getattr(importlib.import_module(data.module_name), data.class_name)
        result = process_config(klass.config_type(), data.config_dict)
        assert result.success, f"{path.name}: {name}: {[e.message for e in result.errors]}"
        loaded[name] = (klass.__name__, result.value)
    return loaded


def run_limits(raw: dict) -> dict:
    runs = raw["concurrency"]["runs"] if "concurrency" in raw else raw["run_coordinator"]["config"]
    return {limit["key"]: limit for limit in runs["tag_concurrency_limits"]}


def test_postgres_instance_takes_its_url_from_the_environment_and_keeps_the_run_limits(tmp_path, monkeypatch):
    path = DEPLOY / "postgres" / "dagster.yaml"
    loaded = load_instance_config(path, tmp_path, monkeypatch)
    klass, storage = loaded["storage"]
    assert klass == "DagsterPostgresStorage"
    assert storage["postgres_url"] == "postgresql+psycopg2://user:secret@db.example:5432/dagster"

    repo = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert run_limits(loaded["raw"]) == run_limits(repo)
    assert loaded["raw"]["run_monitoring"] == repo["run_monitoring"]


def test_k8s_instance_launches_runs_as_jobs_on_the_gpu_pool(tmp_path, monkeypatch):
    import dagster_k8s  # noqa: F401  (the test extra installs it: its launcher schema is what is checked)
    loaded = load_instance_config(DEPLOY / "k8s" / "dagster.yaml", tmp_path, monkeypatch)
    assert loaded["storage"][0] == "DagsterPostgresStorage"
    assert loaded["run_coordinator"][0] == "QueuedRunCoordinator"
    klass, launcher = loaded["run_launcher"]
    assert klass == "K8sRunLauncher"
    pod = launcher["run_k8s_config"]
    assert pod["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["pod_spec_config"]["node_selector"] == {"sftdag.dev/pool": "gpu"}
    assert "sftdag-store-credentials" in launcher["env_secrets"]

    coordinator = loaded["run_coordinator"][1]
    limits = run_limits(loaded["raw"])
    assert set(limits) == RUN_LIMIT_TAGS
    # No more GPU runs than GPU-holding pods the coordinator lets run.
    assert limits["sftdag/gpu"]["limit"] <= coordinator["max_concurrent_runs"]
    assert limits["sftdag/loop"] == run_limits(yaml.safe_load((REPO / "dagster.yaml").read_text()))["sftdag/loop"]


def test_helm_values_say_what_the_k8s_dagster_yaml_says():
    values = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
    instance = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())
    launcher, chart_launcher = instance["run_launcher"]["config"], values["runLauncher"]["config"]["k8sRunLauncher"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert chart_launcher["jobNamespace"] == launcher["job_namespace"]
    assert chart_launcher["envVars"] == launcher["env_vars"]
    chart_pod, pod = chart_launcher["runK8sConfig"], launcher["run_k8s_config"]
    assert chart_pod["containerConfig"] == pod["container_config"]
    assert chart_pod["podSpecConfig"]["nodeSelector"] == pod["pod_spec_config"]["node_selector"]
    assert chart_pod["podSpecConfig"]["tolerations"] == pod["pod_spec_config"]["tolerations"]

    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queue["maxConcurrentRuns"] == instance["run_coordinator"]["config"]["max_concurrent_runs"]
    assert queue["tagConcurrencyLimits"] == instance["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True

    # The code location serves pipelines.definitions; its runs get its env and secrets.
    (location,) = values["dagster-user-deployments"]["deployments"]
    assert location["dagsterApiGrpcArgs"] == ["-m", "pipelines.definitions"]
    assert location["includeConfigInLaunchedRuns"]["enabled"] is True
    assert {e["name"] for e in location["env"]} >= {"SFTDAG_EXPERIMENTS"}
    # The database password lives in a Secret the chart does not write.
    assert values["generatePostgresqlPasswordSecret"] is False and values["postgresql"]["enabled"] is False
    assert "postgresqlPassword" not in values["postgresql"]


def leaves(node, key=""):
    """(key, value) of every scalar in parsed YAML."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from leaves(v, key)
    else:
        yield key, node


def test_no_deploy_file_holds_a_credential():
    for path in DEPLOY.rglob("*.yaml"):
        for key, value in leaves(yaml.safe_load(path.read_text())):
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", str(value)), f"{path}: {key}: a URL with a password"
            is_secret_key = re.search(r"(?i)password|secret_access_key|token", key)
            assert not (is_secret_key and isinstance(value, str)), f"{path}: {key}: a literal secret"


def test_the_k8s_experiment_keeps_its_store_on_object_storage():
    exp = load_experiment(DEPLOY / "k8s" / "experiment.yaml")
    assert exp.store.startswith("s3://")
    assert exp.tracking.mlflow_tracking_uri.startswith("http://")
