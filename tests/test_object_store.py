"""The store on object storage, against a real S3-API server on loopback (moto, its own process).

Each "machine" is a process with its own local cache (`SFTDAG_CACHE`) and the same YAML
(`store: s3://<bucket>/prefix`); the bucket is all they share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import yaml

from tests.conftest import REPO, small_rows, write_jsonl
from tests.s3_server import MotoServer
from trainer.core.config import load_experiment
from trainer.core.store import Store, completion_marker
from trainer.data.prepare import DataPipeline

pytestmark = pytest.mark.slow

# One machine's run of the data stages: every stage's key, whether it was a cache hit, when it was
# built, and the packed rows read back from the local copy (memory-mapped).
MACHINE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from trainer.core.arrow_io import read_shards
    from trainer.core.config import load_experiment
    from trainer.data.prepare import DataPipeline

    go = os.environ.get("GO_FILE")
    if go:  # start together with the other machine
        Path(go + "." + str(os.getpid())).touch()
        while not Path(go).exists():
            time.sleep(0.05)
    outputs = DataPipeline(load_experiment(sys.argv[1]), progress=False).run()
    print(json.dumps({name: {"key": o.key, "cache_hit": o.cache_hit, "created": o.manifest["created"],
                             "path": str(o.path), "rows": read_shards(o.path).num_rows if name.startswith("packed")
                             else None} for name, o in outputs.items()}))
""")


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


@pytest.fixture
def experiment_yaml(s3, tmp_path, monkeypatch):
    """An experiment whose store is a fresh bucket's prefix; this process is machine "a"."""
    for name, value in s3.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache-a"))
    bucket = f"sftdag-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    write_jsonl(tmp_path / "data" / "train.jsonl", small_rows())
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "exp", "store": f"s3://{bucket}/prefix", "tokenizer": {"path": "builtin:tiny"},
        "data": {"source": {"path": "data/*.jsonl"}, "max_length": 128, "rows_per_shard": 16,
                 "eval": {"fraction": 0.2}}}))
    return path


def start_machine(experiment_yaml: Path, cache: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MACHINE, str(experiment_yaml)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "SFTDAG_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **env})


def finish(machine: subprocess.Popen) -> dict:
    out, err = machine.communicate(timeout=300)
    assert machine.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def remote_files(url: str) -> dict[str, bytes]:
    fs, base = fsspec.url_to_fs(url, use_listings_cache=False)
    return {path[len(base) + 1:]: fs.cat_file(path) for path in fs.find(base)}


def test_a_url_stays_a_url_and_its_store_reads_through_a_local_cache(experiment_yaml, tmp_path):
    exp = load_experiment(experiment_yaml)
    assert exp.store.startswith("s3://")
    assert exp.store_root.is_relative_to(tmp_path / "cache-a")
    # The cache directory, as the training plans reopen it from an output's path, is the remote store.
    assert Store(exp.store_root).location == Store(exp.store).location == exp.store


def test_published_stages_are_cache_hits_on_another_machine_and_read_twice_download_once(
        experiment_yaml, s3, tmp_path, monkeypatch):
    exp = load_experiment(experiment_yaml)
    built = DataPipeline(exp, progress=False).run()
    assert not any(o.cache_hit for o in built.values())
    objects = remote_files(exp.store)
    for name, out in built.items():
        stage_dir = f"{out.stage}/{out.key}"
        assert json.loads(objects[f"{stage_dir}/{completion_marker(out.stage)}"]) == out.manifest
        for local in out.path.rglob("*"):
            if local.is_file():
                assert objects[f"{stage_dir}/{local.relative_to(out.path).as_posix()}"] == local.read_bytes()

    bucket = exp.store.split("/")[2]
    before = len(s3.object_downloads(bucket))
    other = finish(start_machine(experiment_yaml, tmp_path / "cache-b"))
    downloaded = s3.object_downloads(bucket)[before:]
    assert set(other) == set(built)
    for name, out in built.items():
        # Not rebuilt: the same manifest (its build time) as machine a's, read from b's own cache.
        assert other[name]["cache_hit"] and other[name]["key"] == out.key
        assert other[name]["created"] == out.manifest["created"]
        assert Path(other[name]["path"]).is_relative_to(tmp_path / "cache-b")
        assert f"/{bucket}/prefix/{out.stage}/{out.key}/{completion_marker(out.stage)}" in downloaded
    assert other["packed/train"]["rows"] > 0 and other["packed/eval"]["rows"] > 0

    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache-b"))  # machine b again
    before = len(s3.object_downloads(bucket))
    again = DataPipeline(load_experiment(experiment_yaml), progress=False).run()
    assert {name: str(o.path) for name, o in again.items()} == {name: o["path"] for name, o in other.items()}
    assert all(o.cache_hit for o in again.values())
    assert s3.object_downloads(bucket)[before:] == []  # every stage from b's cache


def test_a_publisher_killed_before_the_marker_leaves_the_key_incomplete_until_a_later_build(
        experiment_yaml, tmp_path, monkeypatch):
    exp = load_experiment(experiment_yaml)
    # Machine a is SIGKILLed as it starts uploading the first stage's marker: every other file of
    # that stage is in the bucket, the marker is not.
    killer = textwrap.dedent("""
        import os, signal, s3fs
        from trainer.core.store import MANIFEST
        put_file = s3fs.S3FileSystem._put_file
        async def put_file_or_die(self, lpath, rpath, *args, **kwargs):
            if rpath.endswith("/" + MANIFEST):
                os.kill(os.getpid(), signal.SIGKILL)
            return await put_file(self, lpath, rpath, *args, **kwargs)
        s3fs.S3FileSystem._put_file = put_file_or_die
    """)
    killed = subprocess.run([sys.executable, "-c", killer + MACHINE, str(experiment_yaml)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SFTDAG_CACHE": str(tmp_path / "cache-a"), "HF_HUB_OFFLINE": "1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    objects = remote_files(exp.store)
    (stage_dir,) = {"/".join(name.split("/")[:2]) for name in objects}
    assert f"{stage_dir}/manifest.json" not in objects and objects  # uploaded, but not complete
    stage, key = stage_dir.split("/")

    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache-c"))  # a third machine: nothing complete
    assert not Store(exp.store).has(stage, key)
    with pytest.raises(FileNotFoundError, match=f"{stage}/{key} is not in {exp.store}: no manifest.json"):
        Store(exp.store).get(stage, key)

    # Machine a again: its stage (whichever was first: a raw shard, the tokenizer) was complete in its
    # cache, so the run publishes that copy (its manifest, creation time included), then builds the rest.
    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache-a"))
    built_before_the_kill = Store(exp.store).get(stage, key).manifest
    rerun = DataPipeline(load_experiment(experiment_yaml), progress=False).run()
    assert not rerun["packed/train"].cache_hit
    assert all(o.cache_hit for o in rerun.values() if o.key == key)
    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache-c"))
    store = Store(exp.store)
    assert all(store.has(o.stage, o.key) for o in rerun.values())
    assert store.get(stage, key).manifest == built_before_the_kill


def test_two_machines_publishing_the_same_keys_at_once_both_succeed_with_identical_bytes(experiment_yaml, tmp_path):
    go = tmp_path / "go"
    machines = [start_machine(experiment_yaml, tmp_path / f"cache-{m}", GO_FILE=str(go)) for m in "xy"]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    x, y = map(finish, machines)
    objects = remote_files(load_experiment(experiment_yaml).store)
    for name in x:
        assert x[name]["key"] == y[name]["key"]
        for local in Path(x[name]["path"]).rglob("*"):
            relative = local.relative_to(x[name]["path"]).as_posix()
            remote = objects[f"{name.split('/')[0]}/{x[name]['key']}/{relative}"]
            if local.name == completion_marker(name.split("/")[0]):
                # Manifests differ only in build times; the bucket holds one publisher's, whole.
                assert json.loads(remote)["created"] in (x[name]["created"], y[name]["created"])
            else:
                assert remote == local.read_bytes() == (Path(y[name]["path"]) / relative).read_bytes()


@pytest.mark.parametrize("dropped", [["tokenized", "packed"], ["templated", "tokenized", "packed"]])
def test_a_stage_built_from_shards_another_machine_published_downloads_them_first(
        experiment_yaml, tmp_path, monkeypatch, dropped):
    # Machine a publishes every stage; the later stages then go from the bucket (as when another
    # machine is still building them). Machine b finds the split indexes before them in the bucket
    # (downloading an index, not its shards) and builds the rest from those shards.
    exp = load_experiment(experiment_yaml)
    built = DataPipeline(exp, progress=False).run()
    fs, base = fsspec.url_to_fs(exp.store, use_listings_cache=False)
    for stage in dropped:
        fs.rm(f"{base}/{stage}", recursive=True)
    other = finish(start_machine(experiment_yaml, tmp_path / "cache-b"))
    for name, out in built.items():
        assert other[name]["key"] == out.key
        assert other[name]["cache_hit"] == (out.stage not in dropped)
    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache-b"))
    rows = {name: o.path for name, o in DataPipeline(load_experiment(experiment_yaml), progress=False).run().items()}
    for split in ("train", "eval"):
        from trainer.core.arrow_io import read_shards

        assert read_shards(rows[f"packed/{split}"]).equals(read_shards(built[f"packed/{split}"].path))


def test_keys_planned_on_a_machine_that_has_only_the_bucket_match_the_builders(experiment_yaml, tmp_path, monkeypatch):
    from trainer.training.launch import planned_keys

    exp = load_experiment(experiment_yaml)
    pipeline = DataPipeline(exp, progress=False)
    pipeline.run()
    planned = planned_keys(exp, pipeline)
    assert planned["score"] is not None  # keyed by the held-out prompts, which exist now
    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache-b"))  # nothing in b's cache: the bucket only
    exp_b = load_experiment(experiment_yaml)
    assert planned_keys(exp_b, DataPipeline(exp_b, progress=False)) == planned
