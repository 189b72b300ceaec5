"""data.step_per_shard: raw, templated and tokenized as one Dagster step per shard, run by the
multiprocess executor (each step its own process), give the data a one-step preparation gives."""

from __future__ import annotations

import json

import dagster as dg
import yaml

from assets.data import data_asset_key
from trainer.core.arrow_io import read_shards
from trainer.core.config import load_experiment
from trainer.data.prepare import DataPipeline
from trainer.data.stages import read_rejects, read_rows

from .conftest import small_rows, write_jsonl


def write_experiment(tmp_path, **data):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "steps", "store": str(tmp_path / "store"),
        "data": {"name": "steps", "source": {"path": "data/*.jsonl"}, "max_length": 96, "rows_per_shard": 8,
                 "source_rows_per_shard": 20, "eval": {"fraction": 0.2}, "step_per_shard": True, **data},
        "tokenizer": {"path": "builtin:tiny"}}))
    return path


def test_one_step_per_shard_through_the_multiprocess_executor(tmp_path, instance, monkeypatch):
    rows = small_rows(40, seed=3)
    rows[5] = "{broken"
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    path = write_experiment(tmp_path)
    monkeypatch.setenv("SFTDAG_EXPERIMENTS", str(path))
    monkeypatch.setenv("SFTDAG_TEST_GROUP", "steps")
    job = dg.reconstructable(__import__("tests.shard_steps_job", fromlist=["prepare_job"]).prepare_job)
    with dg.execute_job(job, instance=instance, run_config={"execution": {"config": {"multiprocess": {
            "max_concurrent": 2}}}}) as result:
        assert result.success
        steps = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
        pids = {e.pid for e in result.all_events if e.step_key and "_shard[" in e.step_key}
    # 40 lines every 20: 2 shards per split, a step each, per stage
    for stage, asset in (("raw", "raw_dataset"), ("templated", "templated_text"), ("tokenized", "tokenized_rows")):
        prefix = f"steps__{asset}.steps__{stage}_shard["
        assert sorted(s for s in steps if s.startswith(prefix)) == [
            f"{prefix}{split}_{i}]" for split in ("eval", "train") for i in range(2)]
    assert len(pids) > 1  # the steps ran in processes of their own

    # The same data as one step with a process pool, in another store.
    exp = load_experiment(path)
    exp.store = str(tmp_path / "other")
    exp.data.step_per_shard = False
    expected = DataPipeline(exp, progress=False).run()
    mat = instance.get_latest_materialization_event(data_asset_key("steps", "packed")).asset_materialization
    keys = mat.metadata["sftdag/keys"].value
    assert keys == {split: expected[f"packed/{split}"].key for split in ("train", "eval")}
    done = DataPipeline(load_experiment(path), progress=False).run()
    assert all(out.cache_hit for out in done.values())
    for name, out in expected.items():
        if name == "tokenizer":
            continue
        got = done[name]
        assert got.key == out.key and got.manifest["counts"] == out.manifest["counts"]
        assert read_rejects(got).to_pylist() == read_rejects(out).to_pylist()
        if name.startswith("packed"):
            assert read_shards(got.path).to_pylist() == read_shards(out.path).to_pylist()
        else:
            assert read_rows(got).to_pylist() == read_rows(out).to_pylist()
    assert json.loads((tmp_path / "store").joinpath("raw", ".plans").iterdir().__next__().read_text())["train"]

    # Materialized again: every shard and index is in the store, no shard step runs.
    with dg.execute_job(job, instance=instance) as again:
        assert again.success
        assert not [e for e in again.all_events if e.step_key and "_shard[" in e.step_key]
