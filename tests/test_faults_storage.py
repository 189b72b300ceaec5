"""Storage faults: hostile object names in a bucket, a power loss mid-publish (a truncated
completion marker), concurrent `sftdag prepare` reports, and a source with no usable row."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import boto3
import dagster as dg
import pytest
import yaml

from tests.conftest import REPO, small_rows, write_jsonl
from tests.s3_server import MotoServer
from trainer.core.arrow_io import read_shards
from trainer.core.graph import STAGES, completion_marker
from trainer.core.store import Store
from trainer.data.prepare import DataPipeline


# -- 1. object names from the bucket ----------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import s3fs

    # fsspec keeps filesystems per arguments, not per environment: one made for another module's
    # server (another port) would be handed out again.
    s3fs.S3FileSystem.clear_instance_cache()
    server = MotoServer(tmp_path_factory.mktemp("s3") / "access.log")
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("name", ["../../../../escaped.txt",  # out of the cache
                                  "sub/../../../../../escaped.txt",
                                  "../../escaped.txt",  # inside the cache, but outside the stage
                                  "sub//escaped.txt"])
def test_a_traversal_object_name_is_refused_and_nothing_is_written_outside(s3, tmp_path, monkeypatch, name):
    for var, value in s3.environment().items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache"))
    bucket = f"sftdag-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    # A complete-looking stage (its marker is there) with one hostile object beside its files.
    for key, body in {"prefix/raw/k1/rows.txt": b"ok", f"prefix/raw/k1/{name}": b"pwned",
                      "prefix/raw/k1/manifest.json": json.dumps({"counts": {}}).encode()}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    assert f"prefix/raw/k1/{name}" in [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]

    store = Store(f"s3://{bucket}/prefix")
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(ValueError) as error:
        store.get("raw", "k1")
    message = str(error.value)
    assert "\n" not in message and f"prefix/raw/k1/{name}" in message
    assert not [p for p in tmp_path.rglob("*") if p not in before and p.name == "escaped.txt"]
    assert not (tmp_path / "escaped.txt").exists() and not (store.root / "escaped.txt").exists()
    # Nothing half-downloaded looks complete, and no temporary directory is left.
    assert not store.path("raw", "k1").exists() and not list((store.root / "raw").glob(".tmp-*"))


# -- 2. durability: synced before marked complete; a truncated marker is "not built" --------------

def _build(tmp: Path) -> dict:
    (tmp / "rows.txt").write_text("hello")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "more.txt").write_text("more")
    return {"counts": {"rows_out": 1}}


def test_a_build_is_synced_before_the_rename_that_completes_it(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **kw):
        events.append(("rename", os.path.realpath(src)))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    store = Store(tmp_path / "store")
    out = store.get_or_build("stage", "k", _build)
    renames = [i for i, (what, _) in enumerate(events) if what == "rename"]
    assert len(renames) == 1
    at, tmp = renames[0], events[renames[0]][1]
    synced_before = {path for what, path in events[:at] if what == "fsync"}
    for name in ("manifest.json", "rows.txt", "sub/more.txt"):
        assert f"{tmp}/{name}" in synced_before, (name, events)
    assert tmp in synced_before and f"{tmp}/sub" in synced_before
    # The parent directory after the rename: the new entry itself is durable.
    assert ("fsync", str((tmp_path / "store" / "stage").resolve())) in events[at + 1:]
    assert out.path.is_dir() and store.has("stage", "k")


@pytest.mark.parametrize("broken", ["", '{"stage": "stage", "key": "k", "co', "[1, 2"])
def test_a_truncated_manifest_is_not_built_and_is_rebuilt(tmp_path, broken):
    store = Store(tmp_path / "store")
    fresh = store.get_or_build("stage", "k", _build)
    (fresh.path / "manifest.json").write_text(broken)
    (fresh.path / "rows.txt").write_text("")  # its data lost too
    assert not store.has("stage", "k")
    with pytest.raises(FileNotFoundError):
        store.get("stage", "k")
    again = store.get_or_build("stage", "k", _build)
    assert not again.cache_hit and again.path == fresh.path
    assert (again.path / "rows.txt").read_text() == "hello" and (again.path / "sub" / "more.txt").read_text() == "more"
    volatile = ("created", "build_seconds")
    assert {k: v for k, v in again.manifest.items() if k not in volatile} == \
        {k: v for k, v in fresh.manifest.items() if k not in volatile}
    assert store.has("stage", "k") and store.get("stage", "k").manifest == again.manifest
    assert sorted(p.name for p in (tmp_path / "store" / "stage").iterdir() if not p.name.endswith(".lock")) == ["k"]


def test_a_data_stage_with_a_truncated_manifest_is_rebuilt_as_fresh(make_experiment, tmp_path):
    exp = make_experiment(data={"eval": {"fraction": 0.2}})
    fresh = DataPipeline(exp, progress=False).run()
    packed = fresh["packed/train"]
    rows = read_shards(packed.path).to_pylist()
    text = (packed.path / "manifest.json").read_text()
    (packed.path / "manifest.json").write_text(text[: len(text) // 2])  # the power went mid-write

    again = DataPipeline(exp, progress=False).run()
    assert not again["packed/train"].cache_hit and again["packed/train"].key == packed.key
    assert all(again[name].cache_hit for name in again if name != "packed/train")
    assert read_shards(again["packed/train"].path).to_pylist() == rows
    assert again["packed/train"].manifest["counts"] == packed.manifest["counts"]
    assert DataPipeline(exp, progress=False).run()["packed/train"].cache_hit


@pytest.mark.parametrize("stage", ["adapter", "merged", "score"])
def test_a_process_built_stage_with_a_corrupt_marker_is_not_complete(tmp_path, stage):
    from trainer.core.process_step import ProcessStep

    store = Store(tmp_path / "store")
    marker = STAGES[stage].marker
    assert marker == completion_marker(stage) and marker != "manifest.json"
    out = store.path(stage, "k")
    out.mkdir(parents=True)
    (out / marker).write_text('{"train_loss": 1.')  # a process killed by a power loss mid-write
    step = ProcessStep(stage, "k", store, spec=None, module="x")
    assert not store.has(stage, "k") and not step.complete and step.missing() == [out]
    with pytest.raises(FileNotFoundError):
        store.get(stage, "k")
    (out / marker).write_text(json.dumps({"train_loss": 1.0}))
    assert store.has(stage, "k") and step.complete and store.get(stage, "k").manifest == {"train_loss": 1.0}


# -- 3. concurrent prepares: each reports what its own run did -----------------------------------

def _experiment(tmp_path: Path, rows: list) -> Path:
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "faults_exp", "store": "store", "tokenizer": {"path": "builtin:tiny"},
        "data": {"name": "faults_data", "source": {"path": "data/*.jsonl"}, "max_length": 128,
                 "checks": {"min_packing_efficiency": 0.1}}}))
    return path


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "HF_HUB_OFFLINE": "1"}


# The real CLI; the report is only computed once BOTH runs are over (each waits for the other's run
# to end), so whatever "latest materialization" a report could read is the same for both.
GATED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pipelines.cli as cli

    gate, materialize = Path(sys.argv[1]), cli.materialize_experiment
    def gated(*args, **kwargs):
        result = materialize(*args, **kwargs)
        (gate / result.run_id).touch()
        while len(list(gate.iterdir())) < 2:
            time.sleep(0.05)
        return result
    cli.materialize_experiment = gated
    cli.main(sys.argv[2:])
""")


def _run_metadata(instance, run_id: str) -> dict[str, dict]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return {r.event_log_entry.asset_materialization.asset_key.path[-1]: r.event_log_entry.asset_materialization.metadata
            for r in records}


@pytest.mark.slow
def test_concurrent_prepares_each_report_their_own_run(tmp_path):
    experiment = _experiment(tmp_path, small_rows(30))
    gate = tmp_path / "gate"
    gate.mkdir()
    # The instance's database made first: two first commands on a new DAGSTER_HOME race to create it.
    (tmp_path / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")).dispose()
    procs = [subprocess.Popen([sys.executable, "-c", GATED, str(gate), "prepare", str(experiment)], cwd=tmp_path,
                              env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))

    stages = ["tokenizer"] + [f"{s}/train" for s in ("raw", "templated", "tokenized", "packed")]
    hits = [set(r["cache_hits"]) for r in reports]
    assert not all(h >= set(stages) for h in hits), "both say every stage was a cache hit"
    for name in stages:  # a fresh store: each stage built by exactly one of them
        assert (name in hits[0]) != (name in hits[1]), (name, hits)

    assets = {"tokenizer": "tokenizer", "raw/train": "raw_dataset", "templated/train": "templated_text",
              "tokenized/train": "tokenized_rows", "packed/train": "packed_shards"}
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    try:
        for report in reports:
            meta = _run_metadata(instance, report["dagster_run_id"])
            for name, asset in assets.items():
                assert (name in report["cache_hits"]) == meta[asset]["cache_hit"].value, (name, report)
            for stage, built in report["shards_built"].items():
                recorded = meta[assets[f"{stage}/train"]]
                assert built == f"{recorded['shards_built'].value} of {recorded['shards'].value}", (stage, report)
    finally:
        instance.dispose()


# -- 4. a source whose every row is rejected ---------------------------------------------------------

@pytest.mark.slow
def test_a_source_with_every_row_rejected_is_a_failure_naming_the_reason(tmp_path):
    last = _failed_prepare(tmp_path, _experiment(tmp_path, ["{oops"] * 12))
    assert last.startswith("sftdag: data: all 12 rows were rejected"), last
    assert "raw: 12" in last and "nothing to train on" in last


def _failed_prepare(tmp_path: Path, experiment: Path) -> str:
    """The last line `sftdag prepare` prints, having failed."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", str(experiment)], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


# A source that holds no record at all: one line naming it, whatever the file's format (a zero-byte
# JSONL file has no shard, the others one shard with no row).
@pytest.mark.slow
@pytest.mark.parametrize("name, content", [("train.jsonl", ""), ("train.jsonl", "\n  \n\n"), ("train.json", "[]"),
                                           ("train.csv", "prompt,completion\n")])
def test_a_source_with_no_rows_is_a_failure_naming_it(tmp_path, name, content):
    experiment = _experiment(tmp_path, [])
    (tmp_path / "data" / "train.jsonl").unlink()
    (tmp_path / "data" / name).write_text(content)
    spec = yaml.safe_load(experiment.read_text())
    spec["data"]["source"]["path"] = f"data/{name}"
    experiment.write_text(yaml.safe_dump(spec))
    assert _failed_prepare(tmp_path, experiment) == \
        f"sftdag: data: the source (data.source: data/{name}) has no rows — nothing to train on"


# An eval split with no row: the run would train and then evaluate nothing (no held-out loss, no
# score), so it fails before training, naming the split's source.
@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty_eval_source", "rejected_eval_rows", "carved_fraction_of_nothing"])
def test_an_eval_split_with_no_rows_is_a_failure_naming_it(tmp_path, case):
    experiment = _experiment(tmp_path, small_rows(12))
    spec = yaml.safe_load(experiment.read_text())
    if case == "carved_fraction_of_nothing":  # 12 rows, 1% held out: not one
        spec["data"]["eval"] = {"fraction": 0.01}
        expected = "data.eval: the held-out fraction (0.01 of data.source) has no rows"
    else:
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / "eval.jsonl").write_text("" if case == "empty_eval_source" else "{oops\n" * 3)
        spec["data"]["eval"] = {"source": {"path": "eval/eval.jsonl"}}
        expected = ("data.eval: the source (data.eval.source: eval/eval.jsonl) has no rows" if case == "empty_eval_source"
                    else "data.eval: all 3 rows were rejected (raw: 3 malformed record at eval.jsonl)")
    experiment.write_text(yaml.safe_dump(spec))
    assert _failed_prepare(tmp_path, experiment) == f"sftdag: {expected} — nothing to evaluate on"
