"""Which in-progress runs are dead, and the concurrency limits of runs the CLI executes in-process.

A SIGKILLed `sftdag run` never writes its run's end, and Dagster 1.13 does not notice: run
monitoring checks a STARTED run's worker only through `RunLauncher.check_run_worker_health`, which
the DefaultRunLauncher does not support, and runs materialized in-process by the CLI have no
launcher at all. In-progress runs count against `tag_concurrency_limits`, so one zombie would block
every later GPU run.

Liveness is a lease in the instance's own key-value store (`sftdag/lease/<run id>`, so it holds
across hosts and pid namespaces with Postgres): the process executing the run renews it every
RENEW_EVERY_S (expiry LEASE_TTL_S) and releases it when the run ends. Tags would not do: Dagster
copies them onto re-executions. A run is dead when its own lease expired, or at once when the lease
names a process of this machine's boot and pid namespace that is gone (or whose pid was reused). A
run with no lease (launched by the daemon or the UI, a re-execution) is left to Dagster — except
runs of earlier sftdag versions (pid tags, no lease), judged by their tags on SQLite only.

Runs the CLI executes never pass the run queue, so `RunLease.claim_slots` applies the instance's
`tag_concurrency_limits` to them: one Dagster concurrency slot per limited tag (pool
`sftdag/run:<key>=<value>`, atomic on SQLite and Postgres), held by the run id from before the run
is created until it ends, and freed by `fail_dead_runs` when its lease is dead.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping

import dagster as dg
import psutil
# Not exported by dagster; the only way to know that the storage is SQLite.
from dagster._core.storage.event_log.base import EventLogStorage
from dagster._core.storage.runs import SqliteRunStorage

# Tags of runs started by earlier sftdag versions (never written now: re-executions inherit tags).
PID_TAG = "sftdag/pid"
HOST_TAG = "sftdag/host"
PROCESS_STARTED_TAG = "sftdag/process_started"

LEASE_PREFIX = "sftdag/lease/"
LEASE_TTL_S = 30.0
RENEW_EVERY_S = 5.0
SLOT_POOL_PREFIX = "sftdag/run:"
_SETTLE_S = 0.5  # how long a claim waits before trusting that its slot row is its own
_SLOT_STEP = "sftdag_run"  # the "step" a run's slot is claimed for (Dagster's slots are per step)

# Statuses in which a run holds a worker and a concurrency slot (NOT_STARTED holds none, and
# Dagster's start timeout ends it).
_LIVE_STATUSES = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)
# Process start times are kept in clock ticks and event times by the wall clock: allow for rounding.
_CLOCK_SLACK_S = 1.0


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


_BOOT_ID = _read("/proc/sys/kernel/random/boot_id")


def _lease_key(run_id: str) -> str:
    return LEASE_PREFIX + run_id


def _this_process() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_started": psutil.Process(pid).create_time(),
            "pid_ns": _pid_namespace(), "boot_id": _BOOT_ID}


def read_leases(instance: dg.DagsterInstance, run_ids) -> dict[str, dict]:
    """{run id: lease} of those of `run_ids` that hold one."""
    if not run_ids:
        return {}
    values = instance.run_storage.get_cursor_values({_lease_key(r) for r in run_ids})
    leases = {}
    for key, value in values.items():
        try:
            lease = json.loads(value) if value else None
        except ValueError:
            lease = None
        if isinstance(lease, dict) and "expires" in lease:
            leases[key[len(LEASE_PREFIX):]] = lease
    return leases


def _release(instance: dg.DagsterInstance, run_id: str) -> None:
    # The key-value store has no delete: an empty value is no lease.
    instance.run_storage.set_cursor_values({_lease_key(run_id): ""})


def _set_slots(storage: "EventLogStorage", pool: str, limit: int, attempts: int = 5) -> None:
    """`set_concurrency_slots`, tried again when another process created the pool at the same moment:
    on SQLite Dagster reads the pool's limit row, then inserts it, unlocked, so of two runs starting
    at once the later insert fails on the unique key (or finds the database locked); by then the row
    is there, and setting it again updates it."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            storage.set_concurrency_slots(pool, limit)
            return
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.3))


class RunLease:
    """The lease of run `run_id`, executed by this process: renewed from a daemon thread while
    entered; on exit released, with the run's concurrency slots."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str):
        self.instance, self.run_id = instance, run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"sftdag-lease-{run_id}", daemon=True)
        self._process = _this_process()

    def renew(self) -> None:
        lease = {**self._process, "expires": time.time() + LEASE_TTL_S}
        self.instance.run_storage.set_cursor_values({_lease_key(self.run_id): json.dumps(lease)})

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                self.renew()
            except Exception:  # a busy database: the next renewal is still within the expiry
                pass

    def __enter__(self) -> RunLease:
        self.renew()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.instance.event_log_storage.free_concurrency_slots_for_run(self.run_id)
        _release(self.instance, self.run_id)

    def claim_slots(self, tags: Mapping[str, str], log: Callable[[str], None], poll_s: float = 1.0) -> None:
        """Wait until the run, tagged `tags`, fits the instance's `tag_concurrency_limits` (as the
        run queue would let it start), holding one slot per limited tag for this run id."""
        storage = self.instance.event_log_storage
        pools = _limited_pools(self.instance, tags)
        if not pools or not storage.supports_global_concurrency_limits:
            return
        # In the config's order, the same in every process: two runs never hold each other's next slot.
        for pool, (tag, limit) in pools.items():
            said = None
            if storage.get_concurrency_info(pool).slot_count != limit:
                _set_slots(storage, pool, limit)
            checked = 0.0
            while True:
                if storage.claim_concurrency_slot(pool, self.run_id, _SLOT_STEP).is_claimed:
                    others = _other_runs_tagged(self.instance, tag, pool)
                    holders = {s.run_id for s in storage.get_concurrency_info(pool).claimed_slots}
                    if self.run_id in holders and len(holders) + len(others) <= limit:
                        # Two claims at once can take one slot row (on SQLite the free row is read,
                        # then written, unlocked): the later write wins it. Let such a write land,
                        # then make sure the row is still ours.
                        time.sleep(_SETTLE_S)
                        holders = {s.run_id for s in storage.get_concurrency_info(pool).claimed_slots}
                        if self.run_id in holders and len(holders) + len(others) <= limit:
                            break
                    if self.run_id not in holders or len(holders) > limit:
                        # a claim that lost its row, or one too many: give it back, try again later
                        storage.free_concurrency_slots_for_run(self.run_id)
                        time.sleep(random.uniform(0.2, 1.0))
                    blockers = sorted(holders - {self.run_id} | others)
                else:
                    info = storage.get_concurrency_info(pool)
                    blockers = sorted((info.active_run_ids | info.assigned_run_ids) - {self.run_id})
                if blockers != said:
                    said = blockers
                    log(f"waiting for {'run' if len(blockers) == 1 else 'runs'} {', '.join(blockers) or '?'} "
                        f"to end: runs tagged {tag} are limited to {limit} at a time")
                if time.time() - checked > RENEW_EVERY_S:  # a blocker may be dead
                    checked = time.time()
                    fail_dead_runs(self.instance)
                time.sleep(poll_s)


def _limited_pools(instance: dg.DagsterInstance, tags: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """{pool: ("key=value", limit)} for each of the instance's tag_concurrency_limits that `tags` fall under."""
    queue = instance.get_concurrency_config().run_queue_config
    pools = {}
    for rule in (queue.tag_concurrency_limits if queue else None) or ():
        key, value = rule["key"], rule.get("value")
        if key not in tags:
            continue
        if isinstance(value, dict):  # applyLimitPerUniqueValue
            tag = f"{key}={tags[key]}"
        elif value is None:
            tag = key
        elif tags[key] == value:
            tag = f"{key}={value}"
        else:
            continue
        pools[SLOT_POOL_PREFIX + tag] = (tag, int(rule["limit"]))
    return pools


def _other_runs_tagged(instance: dg.DagsterInstance, tag: str, pool: str) -> set[str]:
    """In-progress runs under `tag` that hold no slot of `pool`: those the run queue started."""
    key, _, value = tag.partition("=")
    filters = dg.RunsFilter(statuses=list(_LIVE_STATUSES), tags={key: value} if value else {})
    runs = {r.dagster_run.run_id for r in instance.get_run_records(filters=filters)
            if key in r.dagster_run.tags}
    return runs - {s.run_id for s in instance.event_log_storage.get_concurrency_info(pool).claimed_slots}


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark every STARTING/STARTED run that is dead failed (a CANCELING one canceled, as Dagster's
    own cancel timeout does), and free the concurrency slots of dead leases; returns the run ids ended."""
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=list(_LIVE_STATUSES)))
    storage = instance.event_log_storage
    slot_holders = storage.get_concurrency_run_ids() if storage.supports_global_concurrency_limits else set()
    leases = read_leases(instance, {r.dagster_run.run_id for r in records} | slot_holders)
    ended = []
    for record in records:
        run = record.dagster_run
        lease = leases.get(run.run_id)
        reason = _lease_dead(lease) if lease else _legacy_dead(instance, run)
        if reason is None:
            continue
        # Re-read after seeing it dead: a run it finished just before dying is left alone.
        run = instance.get_run_by_id(run.run_id)
        if run is None or run.status not in _LIVE_STATUSES:
            continue
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, f"{reason}; marked canceled by sftdag")
        else:
            instance.report_run_failed(run, f"{reason}; marked failed by sftdag")
        ended.append(run.run_id)
    # Slots of dead leases: runs just ended, and processes killed while waiting for a slot (no run yet).
    live = {r.dagster_run.run_id for r in records} - set(ended)
    for run_id, lease in leases.items():
        if run_id not in live and (run_id in ended or _lease_dead(lease)):
            if run_id in slot_holders:
                storage.free_concurrency_slots_for_run(run_id)
            _release(instance, run_id)
    return ended


def _lease_dead(lease: dict) -> str | None:
    """Why the lease's run is dead; None while it may be alive."""
    who = f"process {lease.get('pid')} on host {lease.get('host')}"
    now = time.time()
    if lease["expires"] < now:
        return f"{who}: its lease expired {now - lease['expires']:.0f}s ago"
    same_space = (lease.get("boot_id") and lease.get("boot_id") == _BOOT_ID and lease.get("pid_ns") is not None
                  and lease.get("pid_ns") == _pid_namespace() and lease.get("host") == socket.gethostname())
    if same_space and not _alive(int(lease["pid"]), float(lease["process_started"])):
        return f"{who} is gone"
    return None


def _legacy_dead(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """A run of an earlier sftdag (pid tags, no lease): dead when the process that started it — the
    one its tags name, not a re-execution's — is gone. SQLite only: no other pid namespace writes there."""
    if PID_TAG not in run.tags or not isinstance(instance.run_storage, SqliteRunStorage):
        return None
    if run.tags.get(HOST_TAG) != socket.gethostname():
        return None
    pid = int(run.tags[PID_TAG])
    starts = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    if not starts or starts[0].event_log_entry.dagster_event.pid != pid:
        return None  # copied onto a re-execution, or not started yet
    if _alive(pid, float(run.tags[PROCESS_STARTED_TAG])):
        return None
    return f"process {pid} on host {socket.gethostname()} is gone"


def _alive(pid: int, seen_at: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() <= seen_at + _CLOCK_SLACK_S and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:  # another user's process holds the pid: it exists
        return True


@dg.sensor(name="sftdag_dead_runs", minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks runs failed whose sftdag lease is dead, so they free their concurrency slot (the GPU).")
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    ended = fail_dead_runs(context.instance)
    if ended:
        return dg.SkipReason(f"ended {len(ended)} run(s) whose process is gone: {', '.join(ended)}")
    return dg.SkipReason("every in-progress run with an sftdag lease is alive")
