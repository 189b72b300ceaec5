"""The data assets through a real Dagster instance (SQLite storage in a temp folder)."""

import base64
import os
import subprocess
import sys

import dagster as dg
import pytest

from assets.data import data_asset_key, tokenizer_asset_key, raw_files_key
from assets.training import adapter_asset_key
from pipelines.definitions import build_definitions
from pipelines.schedules import retrain_decision
from trainer.core.arrow_io import read_shards
from trainer.core.config import ConfigError
from trainer.data.prepare import DataPipeline

from .conftest import small_rows, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def materialize_data(experiments, instance, group):
    defs = build_definitions(experiments)
    selection = dg.AssetSelection.assets(data_asset_key(group, "packed")).upstream().materializable()
    return dg.materialize(list(defs.assets), selection=selection, instance=instance,
                          resources={"pipes_subprocess_client": dg.PipesSubprocessClient()})


def latest(instance, key):
    return instance.get_latest_materialization_event(key).asset_materialization


def test_materialize_data_assets(make_experiment, instance):
    exp = make_experiment(data={"name": "small", "eval": {"fraction": 0.2},
                                "checks": {"min_packing_efficiency": 0.6, "max_reject_rate": 0.0}})
    result = materialize_data([exp], instance, "small")
    assert result.success
    packed = latest(instance, data_asset_key("small", "packed"))
    p = DataPipeline(exp, progress=False)
    assert packed.tags["dagster/data_version"] == f"{p.key('packed', 'train')}+{p.key('packed', 'eval')}"
    meta = packed.metadata
    counts = p.packed("train").manifest["counts"]
    assert meta["rows"].value == counts["rows_out"] and meta["tokens"].value == counts["tokens"]
    assert meta["cache_hit"].value is False
    # The numbers shown in the UI are those of the shards on disk.
    shards = read_shards(p.packed("train").path)
    lengths = [len(ids) for ids in shards.column("input_ids").to_pylist()]
    documents = [n for row in shards.column("seq_lengths").to_pylist() for n in row]
    assert meta["packed_rows"].value == shards.num_rows and meta["tokens"].value == sum(lengths) == sum(documents)
    assert meta["packing_efficiency"].value == pytest.approx(sum(lengths) / (shards.num_rows * 128))
    histogram = [r.data for r in meta["length_histogram"].value.records]
    assert sum(b["count"] for b in histogram) == len(documents) == meta["rows"].value
    assert [b["count"] for b in histogram] == [sum(b["start"] <= n <= b["end"] for n in documents) for b in histogram]
    stored_plot = (p.packed("train").path / "length_histogram.png").read_bytes()  # drawn with the shards
    assert stored_plot.startswith(b"\x89PNG")
    assert meta["length_histogram_plot"].value == \
        f"![length histogram](data:image/png;base64,{base64.b64encode(stored_plot).decode()})"
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"packing_efficiency": True, "reject_rate": True}
    for stage in ("raw", "templated", "tokenized"):
        mat = latest(instance, data_asset_key("small", stage))
        assert mat.tags["dagster/data_version"].startswith(p.key(stage, "train"))


def test_two_experiments_share_one_data_group_and_its_shards(make_experiment, instance):
    a = make_experiment(name="a", data={"name": "shared"})
    b = make_experiment(name="b", data={"name": "shared"}, training={"learning_rate": 0.01})
    defs = build_definitions([a, b])
    graph = defs.resolve_asset_graph()
    packed = data_asset_key("shared", "packed")
    # Training reads the shards, the held-out prompts, the tokenizer and the raw version, all of
    # the one shared data group.
    shared = {packed, data_asset_key("shared", "templated"), data_asset_key("shared", "raw"),
              tokenizer_asset_key("shared")}
    assert graph.get(adapter_asset_key(a)).parent_keys == shared
    assert graph.get(adapter_asset_key(b)).parent_keys == shared
    assert materialize_data([a], instance, "shared").success
    assert materialize_data([b], instance, "shared").success
    second = latest(instance, packed)
    assert second.metadata["cache_hit"].value is True
    events = instance.fetch_materializations(packed, limit=10).records
    versions = {e.asset_materialization.tags["dagster/data_version"] for e in events}
    assert len(events) == 2 and len(versions) == 1


def test_same_group_with_different_data_settings_is_an_error(make_experiment):
    a = make_experiment(name="a", data={"name": "g"})
    b = make_experiment(name="b", data={"name": "g", "max_length": 64})
    with pytest.raises(ConfigError, match="data settings differ"):
        build_definitions([a, b])


def test_failing_check_is_reported(make_experiment, instance):
    exp = make_experiment(data={"name": "strict", "packing": "none",
                                "checks": {"min_packing_efficiency": 0.99, "max_reject_rate": 0.0}},
                          rows=small_rows(20) + ["{broken"])
    result = materialize_data([exp], instance, "strict")
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["packing_efficiency"].passed is False
    assert checks["reject_rate"].passed is False
    assert checks["reject_rate"].metadata["rejects"].value == 1


def test_changed_data_file_gives_new_versions(make_experiment, instance, tmp_path):
    exp = make_experiment(data={"name": "changing"})
    materialize_data([exp], instance, "changing")
    before = latest(instance, data_asset_key("changing", "packed")).tags["dagster/data_version"]
    write_jsonl(tmp_path / "data" / "train.jsonl", small_rows(41))
    materialize_data([exp], instance, "changing")
    after = latest(instance, data_asset_key("changing", "packed"))
    assert after.tags["dagster/data_version"] != before and after.metadata["cache_hit"].value is False


def test_source_observation_reports_raw_version(make_experiment, instance):
    exp = make_experiment(data={"name": "observed"})
    defs = build_definitions([exp])
    source = next(a for a in defs.assets if getattr(a, "key", None) == raw_files_key("observed"))
    from dagster._core.definitions.observe import observe  # not re-exported by dagster 1.13

    result = observe([source], instance=instance)
    assert result.success
    record = instance.fetch_observations(raw_files_key("observed"), limit=1).records[0]
    assert record.asset_observation.tags["dagster/data_version"] == DataPipeline(exp, progress=False).raw_version()


def test_retrain_schedule_requests_only_when_raw_data_changed(make_experiment, instance, tmp_path):
    exp = make_experiment(name="sched", schedule={"cron": "0 3 * * *"})
    defs = build_definitions([exp])
    schedule = defs.get_schedule_def("sched_retrain")

    first = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert len(first.run_requests) == 1 and "no adapter" in first.run_requests[0].tags["sftdag/retrain_reason"]

    # An adapter trained on the current raw version: the schedule skips, saying why.
    current = DataPipeline(exp, progress=False).raw_version()
    instance.report_runless_asset_event(dg.AssetMaterialization(adapter_asset_key(exp), metadata={"raw_version": current}))
    skipped = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert not skipped.run_requests and "unchanged" in skipped.skip_message
    assert retrain_decision(exp, instance).retrain is False

    write_jsonl(tmp_path / "data" / "train.jsonl", small_rows(45))
    changed = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert len(changed.run_requests) == 1
    assert "raw data changed" in changed.run_requests[0].tags["sftdag/retrain_reason"]
    assert changed.run_requests[0].run_key.endswith(DataPipeline(exp, progress=False).raw_version())


def test_definitions_validate_on_the_workspace():
    proc = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
