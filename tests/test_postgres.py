"""The pipeline on a Dagster instance in PostgreSQL (pipelines/deploy/postgres/dagster.yaml), against
a real server the tests start on a loopback port (tests/postgres_server.py)."""

import datetime
import json
import logging
import os
import subprocess
import sys

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from assets.data import STAGE_ASSETS, data_asset_key
from assets.training import adapter_asset_key, merged_asset_key
from pipelines.cli import materialize_experiment
from pipelines.experiments import ENV_VAR
from trainer.core.config import load_experiment

from .conftest import REPO, small_rows, write_jsonl
from .postgres_server import create_database, postgres_server
from .test_training_assets import TINY_MODEL, TINY_TRAINING

POSTGRES_CONFIG = REPO / "pipelines" / "deploy" / "postgres" / "dagster.yaml"


@pytest.fixture(scope="module")
def server_url():
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_home(server_url, tmp_path, request, monkeypatch):
    """$DAGSTER_HOME holding the documented Postgres config; its URL (a fresh database) in the environment."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(POSTGRES_CONFIG.read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", create_database(server_url, request.node.name.lower()))
    return home


def write_experiment(tmp_path, **top) -> str:
    write_jsonl(tmp_path / "data" / "train.jsonl", small_rows(40))
    config = {"name": "pg_exp", "store": "store",
              "data": {"name": "pg_data", "source": {"path": "data/*.jsonl"}, "max_length": 128,
                       "rows_per_shard": 16, "eval": {"fraction": 0.1}},
              "tokenizer": {"path": "builtin:tiny"}, **top}
    path = tmp_path / "pg_exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rows_in_postgres(table: str) -> int:
    engine = sa.create_engine(os.environ["DAGSTER_POSTGRES_URL"])
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
    finally:
        engine.dispose()


def no_sqlite_files(home) -> bool:
    return not list(home.rglob("*.db"))


@pytest.mark.slow
def test_assets_materialize_and_the_schedule_ticks_on_postgres(postgres_home, tmp_path, monkeypatch):
    from dagster._core.scheduler.instigation import TickStatus
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._scheduler.scheduler import launch_scheduled_runs
    from dagster_postgres import PostgresRunStorage

    path = write_experiment(tmp_path, model=TINY_MODEL, training=TINY_TRAINING,
                            schedule={"cron": "* * * * *", "running": True})
    exp = load_experiment(path)
    instance = dg.DagsterInstance.get()
    assert isinstance(instance.run_storage, PostgresRunStorage)

    result = materialize_experiment(exp, "model", instance=instance)
    assert result.success
    for key in [data_asset_key(exp.data_group, stage) for stage in STAGE_ASSETS] + [adapter_asset_key(exp),
                                                                                   merged_asset_key(exp)]:
        event = instance.get_latest_materialization_event(key)
        assert event is not None and event.run_id == result.run_id, key
    assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS

    # The scheduler daemon's own tick loop, over the code location the UI and daemon load: once to
    # start the schedule, once a minute later; the schedule reads the adapter's materialization from Postgres.
    monkeypatch.setenv(ENV_VAR, path)
    target = ModuleTarget(module_name="pipelines.definitions", attribute="defs", working_directory=str(REPO),
                          location_name="sftdag")
    now = datetime.datetime.now(datetime.timezone.utc)
    logger = logging.getLogger("test_postgres.scheduler")
    with create_test_daemon_workspace_context(target, instance) as workspace:
        for end in (now, now + datetime.timedelta(seconds=60)):
            list(launch_scheduled_runs(workspace, logger, end_datetime_utc=end, iteration_times={}))
        schedule = (workspace.create_request_context().get_code_location("sftdag")
                    .get_repository("__repository__").get_schedule(f"{exp.name}_retrain"))
    ticks = instance.get_ticks(schedule.get_remote_origin_id(), schedule.selector_id)
    assert len(ticks) == 1
    assert ticks[0].status == TickStatus.SKIPPED
    assert "raw data unchanged since the last adapter was trained" in ticks[0].skip_reason

    # All of it is in Postgres: runs and ticks are rows there, and no SQLite file was created.
    assert rows_in_postgres("runs") == 1 and rows_in_postgres("job_ticks") == 1
    assert no_sqlite_files(postgres_home)


@pytest.mark.slow
def test_two_concurrent_sftdag_prepares_both_succeed_and_build_each_stage_once(postgres_home, tmp_path):
    path = write_experiment(tmp_path)
    command = [sys.executable, "-m", "pipelines.cli", "prepare", path]
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    run_ids = {s["dagster_run_id"] for s in summaries}
    assert len(run_ids) == 2

    # The CLI kept the Postgres config in $DAGSTER_HOME and recorded both runs there.
    assert (postgres_home / "dagster.yaml").read_text() == POSTGRES_CONFIG.read_text()
    assert no_sqlite_files(postgres_home)
    instance = dg.DagsterInstance.get()
    records = instance.get_run_records(dg.RunsFilter(run_ids=list(run_ids)))
    assert [r.dagster_run.status for r in records] == [dg.DagsterRunStatus.SUCCESS] * 2
    # They ran at the same time.
    first, second = sorted(records, key=lambda r: r.start_time)
    assert second.start_time < first.end_time

    # Each stage (and split) was built by exactly one of the runs; the other reused it.
    exp = load_experiment(path)
    for stage in STAGE_ASSETS:
        events = instance.fetch_materializations(data_asset_key(exp.data_group, stage), limit=10).records
        assert {e.run_id for e in events} == run_ids
        metadata = [e.asset_materialization.metadata for e in events]
        for flag in ("cache_hit", "eval_cache_hit"):
            assert sorted(m[flag].value for m in metadata) == [False, True], (stage, flag)
        assert len({m["path"].value for m in metadata}) == 1
    assert not list((tmp_path / "store").rglob(".tmp-*"))


@pytest.mark.slow
def test_the_ui_shows_the_runs_and_materializations_kept_in_postgres(postgres_home, tmp_path):
    """`sftdag ui` with the Postgres config in $DAGSTER_HOME reads what a `sftdag prepare` recorded
    there: the run, its status and the packed shards' materialization, and writes no SQLite file."""
    from .ui_server import serve_ui

    path = write_experiment(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", path], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["dagster_run_id"]

    packed = json.dumps(list(data_asset_key("pg_data", "packed").path))
    with serve_ui([path], {}) as query:
        runs = query("{ runsOrError { ... on Runs { results { runId status } } } }")["runsOrError"]["results"]
        asset = query(f'{{ assetOrError(assetKey: {{path: {packed}}}) {{ ... on Asset {{ '
                      f'assetMaterializations(limit: 1) {{ runId }} }} }} }}')["assetOrError"]
    assert runs == [{"runId": run_id, "status": "SUCCESS"}]
    assert asset["assetMaterializations"] == [{"runId": run_id}]
    assert rows_in_postgres("runs") == 1
    assert no_sqlite_files(postgres_home)
