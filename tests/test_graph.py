"""The graph Dagster loads is the declared graph (trainer.core.graph), for every kind of experiment."""

import dagster as dg
import pytest

from assets.graph import asset_key, upstream_keys
from pipelines.definitions import build_definitions
from trainer.core.graph import DATA_STAGES, NODES, STAGES, data_stage_inputs
from trainer.core.store import CODE_VERSIONS, completion_marker
from trainer.data.prepare import DataPipeline

LOOP = {"prompts": {"source": {"builtin": "default", "rows": 8}},
        "filters": [{"verifier": "trainer.data.default_data:verify"}]}


def experiments(make_experiment, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")  # only its name makes the asset key; nothing reads it here
    return [
        make_experiment("plain"),
        make_experiment("with_eval", data={"eval": {"fraction": 0.2}}),
        make_experiment("per_shard", data={"step_per_shard": True, "name": "per_shard_group"}),
        make_experiment("loop_from_sft", data={"name": "loop_group"}, loop=LOOP),
        make_experiment("loop_from_base", data={"name": "gguf_group"}, model={"base": str(gguf)},
                        loop={**LOOP, "start_model": "base"}),
    ]


@pytest.fixture
def loaded(make_experiment, tmp_path):
    exps = experiments(make_experiment, tmp_path)
    return exps, build_definitions(exps).resolve_asset_graph()


def node_of(exp, key: dg.AssetKey) -> str | None:
    return next((n for n in NODES if asset_key(exp, n) == key), None)


def test_every_loaded_asset_is_a_declared_node_with_its_declared_upstream(loaded):
    exps, graph = loaded
    for key in graph.get_all_asset_keys():
        owners = [(exp, node_of(exp, key)) for exp in exps if node_of(exp, key)]
        assert owners, f"{key.to_user_string()} is loaded but declared by no node"
        exp, node = owners[0]
        assert set(graph.get(key).parent_keys) == set(upstream_keys(exp, node).values()), key.to_user_string()
    for exp in exps:  # and every node an experiment has is loaded
        missing = [n for n in NODES if asset_key(exp, n) is not None and asset_key(exp, n) not in graph.get_all_asset_keys()]
        assert not missing, (exp.name, missing)


def test_loop_start_model_is_the_one_node_the_experiment_names(loaded):
    exps, graph = loaded
    by_name = {e.name: e for e in exps}
    samples = graph.get(asset_key(by_name["loop_from_sft"], "round_samples")).parent_keys
    assert asset_key(by_name["loop_from_sft"], "merged_model") in samples
    base = graph.get(asset_key(by_name["loop_from_base"], "round_samples")).parent_keys
    assert asset_key(by_name["loop_from_base"], "base_model") in base
    assert asset_key(by_name["loop_from_base"], "merged_model") not in base


def test_code_versions_and_markers_come_from_the_table(loaded):
    exps, graph = loaded
    for exp in exps:
        for node in ("tokenizer", "raw_dataset", "templated_text", "tokenized_rows", "packed_shards",
                     "trained_adapter", "merged_model", "evaluation"):
            key = asset_key(exp, node)
            assert graph.get(key).code_version == STAGES[NODES[node].stage].code_version
    assert CODE_VERSIONS == {name: s.code_version for name, s in STAGES.items()}
    assert completion_marker("adapter") == STAGES["adapter"].marker != completion_marker("raw")


def test_data_pipeline_keys_its_stages_by_the_declared_inputs(make_experiment):
    pipeline = DataPipeline(make_experiment("plain"), progress=False)
    for stage in DATA_STAGES:
        assert pipeline.stage(stage, "train").inputs == data_stage_inputs(stage)
    # the declared inputs are exactly those whose keys the stage's key is made of
    record = pipeline.store.key_record("templated", pipeline.key("templated", "train"))
    assert list(record["inputs"]) == ["raw", "tokenizer"]
    assert record["inputs"]["raw"] == pipeline.key("raw", "train")
