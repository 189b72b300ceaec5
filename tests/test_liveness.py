"""A SIGKILLed run's process leaves its run STARTED; `fail_dead_runs` (the CLI, the sensor) ends it."""

import json
import signal
import socket
import subprocess
import sys
import time

import dagster as dg
import psutil
from filelock import FileLock

from pipelines.definitions import build_definitions
from pipelines.liveness import LEASE_PREFIX, PID_TAG, dead_run_sensor, fail_dead_runs, read_leases
from trainer.core.config import load_experiment
from trainer.data.prepare import DataPipeline

from .test_cli import run_cli, write_experiment

# Executes an asset that blocks, in-process like the CLI; argv: marker file, then "leased" (as the
# CLI does now), "legacy" (the pid tags of earlier sftdag versions) or "plain" (as daemon-launched runs).
BLOCKING_RUN = """
import os, socket, sys, time, uuid
import dagster as dg
import psutil
from pipelines.liveness import HOST_TAG, PID_TAG, PROCESS_STARTED_TAG, RunLease

@dg.asset
def blocks():
    open(sys.argv[1], "w").close()
    time.sleep(600)

instance, run_id = dg.DagsterInstance.get(), str(uuid.uuid4())
job = dg.Definitions(assets=[blocks], jobs=[dg.define_asset_job("blocking")]).resolve_job_def("blocking")
tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(),
        PROCESS_STARTED_TAG: repr(psutil.Process().create_time())} if sys.argv[2] == "legacy" else {}
if sys.argv[2] == "leased":
    with RunLease(instance, run_id):
        job.execute_in_process(instance=instance, run_id=run_id)
else:
    job.execute_in_process(instance=instance, run_id=run_id, tags=tags)
"""


def start_blocking_runs(tmp_path, **modes: str) -> dict[str, subprocess.Popen]:
    """{name: process} for processes whose run is in progress, blocked; modes[name]: see BLOCKING_RUN."""
    procs = {name: subprocess.Popen([sys.executable, "-c", BLOCKING_RUN, str(tmp_path / name), mode])
             for name, mode in modes.items()}
    deadline = time.time() + 30
    for name, proc in procs.items():
        while not (tmp_path / name).exists():
            assert proc.poll() is None and time.time() < deadline, f"{name}: the blocking run did not start"
            time.sleep(0.1)
    return procs


def run_of(instance, proc) -> dg.DagsterRun:
    """The run whose RUN_START event `proc` wrote."""
    for record in instance.get_run_records():
        starts = instance.get_records_for_run(record.dagster_run.run_id, of_type=dg.DagsterEventType.RUN_START).records
        if starts and starts[0].event_log_entry.dagster_event.pid == proc.pid:
            return instance.get_run_by_id(record.dagster_run.run_id)
    raise AssertionError(f"no run started by process {proc.pid}")


def last_message(instance, run_id: str) -> str:
    return instance.get_records_for_run(run_id, ascending=False, limit=1).records[0].event_log_entry.message


def edit_lease(instance, run_id: str, **changes):
    lease = {**read_leases(instance, {run_id})[run_id], **changes}
    instance.run_storage.set_cursor_values({LEASE_PREFIX + run_id: json.dumps(lease)})


def test_runs_of_dead_processes_are_ended_and_live_ones_kept(tmp_path, instance):
    procs = start_blocking_runs(tmp_path, killed="leased", canceling="leased", alive="leased",
                                legacy="legacy", unleased="plain")
    try:
        runs = {name: run_of(instance, proc) for name, proc in procs.items()}
        assert set(read_leases(instance, {r.run_id for r in runs.values()})) == {
            runs[name].run_id for name in ("killed", "canceling", "alive")}
        instance.report_run_canceling(runs["canceling"])
        for name in ("killed", "canceling", "legacy", "unleased"):
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait()
        assert instance.get_run_by_id(runs["killed"].run_id).status == dg.DagsterRunStatus.STARTED

        # The daemon's path: the code location's sensor, on by default.
        assert dead_run_sensor in build_definitions([]).sensors
        assert dead_run_sensor.default_status == dg.DefaultSensorStatus.RUNNING
        skip = dead_run_sensor(dg.build_sensor_context(instance=instance))
        for name in ("killed", "canceling", "legacy"):
            assert runs[name].run_id in skip.skip_message
        for name in ("killed", "legacy"):
            assert instance.get_run_by_id(runs[name].run_id).status == dg.DagsterRunStatus.FAILURE
            assert last_message(instance, runs[name].run_id) == (
                f"process {procs[name].pid} on host {socket.gethostname()} is gone; marked failed by sftdag")
        # As Dagster's own cancel timeout does: a run being canceled whose process is gone is canceled.
        assert instance.get_run_by_id(runs["canceling"].run_id).status == dg.DagsterRunStatus.CANCELED
        # No lease: not sftdag's to judge (Dagster's run monitoring owns it).
        assert instance.get_run_by_id(runs["unleased"].run_id).status == dg.DagsterRunStatus.STARTED
        assert instance.get_run_by_id(runs["alive"].run_id).status == dg.DagsterRunStatus.STARTED
        assert fail_dead_runs(instance) == []

        alive = runs["alive"].run_id
        # A fresh lease from another host (or pid namespace) is not this machine's to judge.
        edit_lease(instance, alive, host="another-host", pid=procs["killed"].pid)
        assert fail_dead_runs(instance) == []
        # The pid now belongs to a process that started after the run's owner: the pid was reused.
        edit_lease(instance, alive, host=socket.gethostname(), pid=procs["alive"].pid,
                   process_started=psutil.Process(procs["alive"].pid).create_time() - 60)
        assert fail_dead_runs(instance) == [alive]
        assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.FAILURE
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_killed_sftdag_prepare_is_ended_by_the_next_command(tmp_path, instance):
    """The user's case: a SIGKILLed `sftdag prepare` leaves its run STARTED; the next `sftdag`
    command that materializes ends it before its own run."""
    experiment = write_experiment(tmp_path)
    # Holding the raw stage's build lock (as a concurrent build would) keeps the CLI's run in progress.
    raw_key = DataPipeline(load_experiment(experiment), progress=False).raw_key("train")
    lock = tmp_path / "store" / "raw" / f".{raw_key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)  # planning the key recorded it there
    with FileLock(str(lock)):
        cli = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "prepare", str(experiment)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            started = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
            deadline = time.time() + 60
            while not instance.get_run_records(filters=started):
                assert cli.poll() is None, cli.stderr.read()[-3000:]
                assert time.time() < deadline, "the CLI's run did not start"
                time.sleep(0.1)
        finally:
            cli.kill()
            cli.wait()
            cli.stderr.close()
    [record] = instance.get_run_records()
    run_id = record.dagster_run.run_id
    assert PID_TAG not in record.dagster_run.tags and read_leases(instance, {run_id})[run_id]["pid"] == cli.pid
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED

    again = run_cli(["prepare", str(experiment)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sftdag: run {run_id} was in progress but its process is gone; ended it" in again.stderr
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert last_message(instance, run_id) == (
        f"process {cli.pid} on host {socket.gethostname()} is gone; marked failed by sftdag")
