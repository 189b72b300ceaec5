"""End runs whose process is gone, so they stop holding concurrency slots (the GPU) as "in progress".

A SIGKILLed `sftdag run` never writes its run's end, and Dagster 1.13 does not notice: run
monitoring checks a STARTED run's worker only through `RunLauncher.check_run_worker_health`, which
the DefaultRunLauncher does not support (only the max_runtime tag ends such a run), and runs
materialized in-process by the CLI have no launcher at all. In-progress runs count against
`tag_concurrency_limits`, so one zombie would block every later GPU run.

Each run's owning process is identified by pid plus a time at which that process was known to run
(a process holding the pid now but created after that time is another one: the pid was reused):

- CLI runs carry `process_tags()`: host, pid and the process's start time.
- Other runs (daemon-launched through the default launcher's code server, `dagster asset
  materialize`, …) have no host recorded anywhere by Dagster; the pid of the process that wrote
  their RUN_START event is used only when the instance's storage is SQLite, which puts every
  process writing to it on this host. With another storage those runs are left to Dagster.
"""

from __future__ import annotations

import os
import socket

import dagster as dg
import psutil
# Not exported by dagster; the only way to know that the storage is SQLite.
from dagster._core.storage.runs import SqliteRunStorage

PID_TAG = "sftdag/pid"
HOST_TAG = "sftdag/host"
PROCESS_STARTED_TAG = "sftdag/process_started"

# Statuses in which a run holds a worker and a concurrency slot (NOT_STARTED holds none, and
# Dagster's start timeout ends it).
_LIVE_STATUSES = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)
# Process start times are kept in clock ticks and event times by the wall clock: allow for rounding.
_CLOCK_SLACK_S = 1.0


def process_tags() -> dict[str, str]:
    """Run tags naming this process as the run's owner (for runs it executes in-process)."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(),
            PROCESS_STARTED_TAG: repr(psutil.Process(pid).create_time())}


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark every STARTING/STARTED run whose process on this host is gone failed (a CANCELING one
    canceled, as Dagster's own cancel timeout does); returns their run ids."""
    host = socket.gethostname()
    ended = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=list(_LIVE_STATUSES))):
        run = record.dagster_run
        owner = _owner(instance, run, host)
        if owner is None or _alive(*owner):
            continue
        # Re-read after seeing the process dead: a run it finished just before dying is left alone.
        run = instance.get_run_by_id(run.run_id)
        if run is None or run.status not in _LIVE_STATUSES:
            continue
        pid = owner[0]
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, f"process {pid} on host {host} is gone; marked canceled by sftdag")
        else:
            instance.report_run_failed(run, f"process {pid} on host {host} is gone; marked failed by sftdag")
        ended.append(run.run_id)
    return ended


def _owner(instance: dg.DagsterInstance, run: dg.DagsterRun, host: str) -> tuple[int, float] | None:
    """(pid, a time at which it ran) of the run's process on this host; None when not knowable here."""
    if PID_TAG in run.tags:
        if run.tags.get(HOST_TAG) != host:
            return None
        return int(run.tags[PID_TAG]), float(run.tags[PROCESS_STARTED_TAG])
    if not isinstance(instance.run_storage, SqliteRunStorage):
        return None
    starts = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    if not starts or starts[0].event_log_entry.dagster_event.pid is None:
        return None  # STARTING: the worker has not started the run yet (Dagster's start timeout applies)
    entry = starts[0].event_log_entry
    return entry.dagster_event.pid, entry.timestamp


def _alive(pid: int, seen_at: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() <= seen_at + _CLOCK_SLACK_S and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:  # another user's process holds the pid: it exists
        return True


@dg.sensor(name="sftdag_dead_runs", minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks runs failed whose process is gone, so they free their concurrency slot (the GPU).")
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    ended = fail_dead_runs(context.instance)
    if ended:
        return dg.SkipReason(f"ended {len(ended)} run(s) whose process is gone: {', '.join(ended)}")
    return dg.SkipReason("every in-progress run's process is alive (or on another host)")
