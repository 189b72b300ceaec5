"""Faults in deciding which runs are dead, and in the concurrency limits of runs the CLI starts."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import dagster as dg
import psutil
import pytest
import yaml
from filelock import FileLock

from pipelines.liveness import HOST_TAG, PID_TAG, PROCESS_STARTED_TAG, SLOT_POOL_PREFIX, RunLease, fail_dead_runs
from trainer.core.config import load_experiment
from trainer.data.prepare import DataPipeline

from .test_cli import run_cli, write_experiment
from .test_postgres import postgres_home, server_url  # noqa: F401 (fixtures)

LEASE_PREFIX = "sftdag/lease/"  # the lease's key in the instance's key-value store, by run id


def gone_process() -> tuple[int, float]:
    """(pid, start time) of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def add_started_run(instance, tags: dict) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="__ephemeral_asset_job__", run_id=run_id, tags=tags,
                                   status=dg.DagsterRunStatus.STARTED))
    return run_id


def write_lease(instance, run_id: str, **fields):
    instance.run_storage.set_cursor_values({LEASE_PREFIX + run_id: json.dumps(fields)})


def lease_of(instance, run_id: str) -> dict | None:
    value = instance.run_storage.get_cursor_values({LEASE_PREFIX + run_id}).get(LEASE_PREFIX + run_id)
    return json.loads(value) if value else None


def status(instance, run_id):
    return instance.get_run_by_id(run_id).status


def test_a_reexecuted_run_with_copied_tags_is_not_failed(instance):
    # Dagster copies a run's tags onto its re-execution: the original sftdag process is gone, the
    # re-execution (launched by the daemon, no lease of its own) is alive.
    pid, started = gone_process()
    tags = {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), PROCESS_STARTED_TAG: repr(started),
            "dagster/parent_run_id": str(uuid.uuid4())}
    run_id = add_started_run(instance, tags)
    assert fail_dead_runs(instance) == []
    assert status(instance, run_id) == dg.DagsterRunStatus.STARTED


def test_b_a_fresh_lease_from_another_pid_namespace_is_alive(instance):
    # Another container with the same host name: its pid means nothing here.
    pid, started = gone_process()
    run_id = add_started_run(instance, {PID_TAG: str(pid), HOST_TAG: socket.gethostname(),
                                        PROCESS_STARTED_TAG: repr(started)})
    write_lease(instance, run_id, expires=time.time() + 30, host=socket.gethostname(), pid=pid,
                process_started=started, pid_ns=1, boot_id="another-boot")
    assert fail_dead_runs(instance) == []
    assert status(instance, run_id) == dg.DagsterRunStatus.STARTED


def test_d_an_expired_lease_from_another_host_is_failed(instance):
    run_id = add_started_run(instance, {PID_TAG: "4242", HOST_TAG: "another-host", PROCESS_STARTED_TAG: "1.0"})
    write_lease(instance, run_id, expires=time.time() - 1, host="another-host", pid=4242, process_started=1.0,
                pid_ns=1, boot_id="another-boot")
    assert fail_dead_runs(instance) == [run_id]
    assert status(instance, run_id) == dg.DagsterRunStatus.FAILURE
    [last] = instance.get_records_for_run(run_id, ascending=False, limit=1).records
    assert "lease expired" in last.event_log_entry.message and "another-host" in last.event_log_entry.message


def test_c_a_killed_sftdag_run_is_failed_at_once_by_its_lease(tmp_path, instance):
    experiment = write_experiment(tmp_path)
    raw_key = DataPipeline(load_experiment(experiment), progress=False).raw_key("train")
    lock = tmp_path / "store" / "raw" / f".{raw_key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):  # keeps the CLI's run in progress
        cli = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "prepare", str(experiment)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            started = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
            deadline = time.time() + 60
            while not instance.get_run_records(filters=started):
                assert cli.poll() is None, cli.stderr.read()[-3000:]
                assert time.time() < deadline, "the CLI's run did not start"
                time.sleep(0.1)
            [record] = instance.get_run_records(filters=started)
            run_id = record.dagster_run.run_id
            lease = lease_of(instance, run_id)
            assert lease is not None and lease["pid"] == cli.pid and lease["expires"] > time.time()
            # Nothing the run's re-execution could inherit names its process.
            assert PID_TAG not in record.dagster_run.tags
            assert fail_dead_runs(instance) == []
        finally:
            cli.send_signal(signal.SIGKILL)
            cli.wait()
            cli.stderr.close()
    # Same host and pid namespace: its process is known gone without waiting for the lease to expire.
    assert fail_dead_runs(instance) == [run_id]
    assert status(instance, run_id) == dg.DagsterRunStatus.FAILURE
    [last] = instance.get_records_for_run(run_id, ascending=False, limit=1).records
    assert last.event_log_entry.message == (
        f"process {cli.pid} on host {socket.gethostname()} is gone; marked failed by sftdag")
    assert lease_of(instance, run_id) is None


def step_window(instance, run_id: str, name: str) -> tuple[float, float]:
    """(start, end) of the run's step whose key contains `name`."""
    times = {}
    for record in instance.get_records_for_run(run_id).records:
        event = record.event_log_entry.dagster_event
        if event and event.step_key and name in event.step_key and event.event_type in (
                dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS):
            times[event.event_type] = record.event_log_entry.timestamp
    return times[dg.DagsterEventType.STEP_START], times[dg.DagsterEventType.STEP_SUCCESS]


@pytest.mark.slow
def test_two_concurrent_gpu_runs_of_the_cli_do_not_overlap(tmp_path, instance):
    base = write_experiment(tmp_path, name="gpu_a")
    config = yaml.safe_load(base.read_text())
    config["model"] = {"base": "builtin:tiny-llama", "builtin_config": {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 256}}
    config["training"] = {"gpu": True, "max_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "no",
                          "accuracy_rows": 2, "max_new_tokens": 2, "sample_generations": 0, "lora": {"r": 4}}
    experiments = []
    for name, lr in (("gpu_a", 0.01), ("gpu_b", 0.02)):  # differing: each trains its own adapter
        config.update(name=name)
        config["training"]["learning_rate"] = lr
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        experiments.append(path)
    assert run_cli(["prepare", str(experiments[0])], tmp_path).returncode == 0
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(path)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for path in experiments]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    run_ids = [json.loads(out.strip().splitlines()[-1])["dagster_run_id"] for out, _ in outputs]
    (a_start, a_end), (b_start, b_end) = (step_window(instance, run_id, "trained_adapter") for run_id in run_ids)
    assert a_end <= b_start or b_end <= a_start, "two GPU trainings ran at once"
    # The one that waited said what for; both slots and leases are given back.
    assert any("waiting for" in err and "sftdag/gpu" in err for _, err in outputs)
    assert not instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots
    assert all(lease_of(instance, run_id) is None for run_id in run_ids)


GPU_POOL = SLOT_POOL_PREFIX + "sftdag/gpu=true"
GPU = {"sftdag/gpu": "true"}

# Holds the GPU slot for a run id not created yet (as the CLI does before its run starts), then blocks.
HOLD_SLOT = """
import sys, time
import dagster as dg
from pipelines.liveness import RunLease
with RunLease(dg.DagsterInstance.get(), sys.argv[1]) as lease:
    lease.claim_slots({"sftdag/gpu": "true"}, log=print)
    open(sys.argv[2], "w").close()
    time.sleep(600)
"""


def check_slots(instance, tmp_path):
    # A process killed while holding the slot (before its run existed): its lease frees it.
    holder = str(uuid.uuid4())
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SLOT, holder, str(tmp_path / "holding")])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "holding").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        assert {s.run_id for s in instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots} == {holder}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # A run the run queue started (no slot, no lease) counts against the limit too.
    queued = add_started_run(instance, GPU)
    said, done = [], []

    def claim():
        with RunLease(instance, str(uuid.uuid4())) as lease:
            lease.claim_slots(GPU, log=said.append, poll_s=0.1)
            done.append(time.time())

    thread = threading.Thread(target=claim)
    thread.start()
    try:
        deadline = time.time() + 30
        # The waiter frees the dead holder's slot (within RENEW_EVERY_S), then waits for the queued run.
        while not said or f"waiting for run {queued} " not in said[-1]:
            assert time.time() < deadline and thread.is_alive(), said
            time.sleep(0.1)
        assert holder not in {s.run_id for s in instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots}
        time.sleep(0.5)
        assert not done, "claimed while a queued GPU run was in progress"
        instance.report_run_failed(instance.get_run_by_id(queued), "done")
        thread.join(timeout=30)
        assert done
    finally:
        thread.join(timeout=30)
    assert lease_of(instance, holder) is None
    assert not instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots


def test_slots_of_dead_holders_are_freed_and_queued_runs_count(instance, tmp_path):
    check_slots(instance, tmp_path)


@pytest.mark.slow
def test_leases_and_slots_on_postgres(postgres_home, tmp_path):
    instance = dg.DagsterInstance.get()
    try:
        check_slots(instance, tmp_path)
        test_d_an_expired_lease_from_another_host_is_failed(instance)
        test_b_a_fresh_lease_from_another_pid_namespace_is_alive(instance)
    finally:
        instance.dispose()


def test_a_pool_another_run_creates_at_the_same_moment_is_joined_not_a_crash(instance, monkeypatch):
    # On SQLite, Dagster reads a pool's limit row and then inserts it, unlocked: of two runs starting
    # at once, the later insert fails on the unique key (seen in CI: one `sftdag run` of two ended
    # with sqlite3.IntegrityError). Here the other run's row lands between the read and the insert.
    from dagster._core.storage.event_log.schema import ConcurrencyLimitsTable

    storage = instance.event_log_storage
    set_slots = storage.set_concurrency_slots
    raced = []

    def the_other_run_first(pool, limit):
        if not raced:
            raced.append(pool)
            set_slots(pool, limit)  # the other run's
            with storage.index_transaction() as conn:  # this run's insert, which read no row
                conn.execute(ConcurrencyLimitsTable.insert().values(concurrency_key=pool, limit=limit))
        set_slots(pool, limit)

    monkeypatch.setattr(storage, "set_concurrency_slots", the_other_run_first)
    run_id = str(uuid.uuid4())
    with RunLease(instance, run_id) as lease:
        lease.claim_slots(GPU, log=lambda message: None, poll_s=0.1)
        assert {s.run_id for s in storage.get_concurrency_info(GPU_POOL).claimed_slots} == {run_id}
    assert raced == [GPU_POOL]
    assert storage.get_concurrency_info(GPU_POOL).slot_count == 1
