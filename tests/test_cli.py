"""The `sftdag` command as a user runs it: a subprocess, a persistent instance, JSON on the last line."""

import json
import os
import subprocess
import sys

import dagster as dg
import pytest
import yaml

from trainer.core.arrow_io import read_shards

from .conftest import small_rows, write_jsonl
from .ui_server import serve_ui

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_experiment(tmp_path, name="cli_exp", rows=None):
    write_jsonl(tmp_path / "data" / "train.jsonl", rows or small_rows(30))
    config = {"name": name, "store": "store",
              "data": {"name": "cli_data", "source": {"path": "data/*.jsonl"}, "max_length": 128,
                       "checks": {"min_packing_efficiency": 0.5}},
              "tokenizer": {"path": "builtin:tiny"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args, tmp_path, **kw):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


# For run_cli_in_probe: which model libraries the command imported.
MODEL_LIBRARIES_IMPORTED = "'imported:', sorted(m for m in ('torch', 'transformers') if m in sys.modules)"


def run_cli_in_probe(args, tmp_path, before: str, report: str) -> tuple[subprocess.CompletedProcess, str]:
    """The command in a Python process that runs `before` first and prints `report` (an expression)
    last on stderr, whatever happens: (the process, that last line)."""
    probe = (f"import sys\n{before}\nfrom pipelines.cli import main\n"
             f"try:\n    main(sys.argv[1:])\nfinally:\n    print({report}, file=sys.stderr)")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    done = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    return done, done.stderr.strip().splitlines()[-1]


def test_prepare_prints_json_and_records_runs_in_the_instance(tmp_path):
    experiment = write_experiment(tmp_path, rows=small_rows(30) + ["{oops"])
    proc = run_cli(["prepare", str(experiment)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows_in"] == 31 and summary["rejects"] == 1 and summary["rows_out"] == 30
    assert os.path.isdir(summary["shards"]) and summary["shards"].startswith(str(tmp_path / "store"))
    # The JSON describes the shards on disk.
    shards = read_shards(summary["shards"])
    lengths = [len(ids) for ids in shards.column("input_ids").to_pylist()]
    trainable = sum(label != -100 for labels in shards.column("labels").to_pylist() for label in labels)
    assert shards.num_rows == summary["packed_rows"] and sum(lengths) == summary["tokens"]
    assert sum(len(docs) for docs in shards.column("seq_lengths").to_pylist()) == summary["rows_out"]
    assert trainable == summary["trainable_tokens"] > 0
    assert summary["packing_efficiency"] == pytest.approx(sum(lengths) / (shards.num_rows * 128))

    # Again: every stage is a cache hit, and both runs are in the persistent instance. A cached
    # run loads no tokenizer and no model code: neither transformers nor torch is imported.
    again, last = run_cli_in_probe(["prepare", str(experiment)], tmp_path, "", MODEL_LIBRARIES_IMPORTED)
    assert again.returncode == 0, again.stderr[-3000:]
    assert last == "imported: []"
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["data_version"] == summary["data_version"] and second["dagster_run_id"] != summary["dagster_run_id"]
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    try:
        records = instance.fetch_materializations(dg.AssetKey(["cli_data", "packed_shards"]), limit=5).records
        assert len(records) == 2
        assert [r.asset_materialization.metadata["cache_hit"].value for r in records] == [True, False]
    finally:
        instance.dispose()


def test_bad_experiment_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  packing: greedy\n")
    proc = run_cli(["prepare", str(bad)], tmp_path)
    assert proc.returncode != 0
    assert "data.packing" in proc.stderr and "greedy" in proc.stderr


@pytest.mark.slow
def test_ui_serves_the_code_location_on_localhost(tmp_path):
    experiment = write_experiment(tmp_path)
    with serve_ui([str(experiment)], {"DAGSTER_HOME": str(tmp_path / "dagster_home")}) as query:
        nodes = query("{ assetNodes { assetKey { path } } }")["assetNodes"]
    keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert {"cli_data/packed_shards", "cli_exp/trained_adapter", "cli_exp/merged_model"} <= keys


def test_run_trains_and_merges_without_loading_a_model_in_the_orchestrator(tmp_path):
    """`sftdag run` end to end: building the base model, training, merging and scoring happen in
    their own processes; once the data is prepared (tokenizing loads transformers), the
    orchestrator imports neither torch nor transformers."""
    experiment = write_experiment(tmp_path, name="cli_run")
    config = yaml.safe_load(experiment.read_text())
    config["data"]["eval"] = {"fraction": 0.2}
    config["model"] = {"base": "builtin:tiny-llama", "builtin_config": {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 256}}
    config["training"] = {"max_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "no",
                          "accuracy_rows": 4, "max_new_tokens": 4, "sample_generations": 0, "lora": {"r": 4}}
    experiment.write_text(yaml.safe_dump(config))
    assert run_cli(["prepare", str(experiment)], tmp_path).returncode == 0
    proc, last = run_cli_in_probe(["run", str(experiment)], tmp_path, "", MODEL_LIBRARIES_IMPORTED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last == "imported: []"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert os.path.isfile(os.path.join(summary["merged_model_dir"], "model.safetensors"))
    training = json.loads(open(os.path.join(summary["adapter_dir"], "training_summary.json")).read())
    assert training["global_step"] == 2 and os.path.isdir(training["base_model_path"])


def test_prepare_loads_the_tokenizer_once_beside_the_raw_shards(tmp_path):
    """Through the command (its Dagster run executes every step in this process): a fresh store's
    tokenizer is loaded once, in the background while the raw shards are built, and the tokenizer
    asset's step takes that load."""
    experiment = write_experiment(tmp_path)
    counting = ("import threading\nfrom trainer.data import prepare\n"
                "loads = []\nload = prepare._load_tokenizer_bundle\n"
                "def counted(exp):\n    loads.append(threading.current_thread().name)\n    return load(exp)\n"
                "prepare._load_tokenizer_bundle = counted")
    done, last = run_cli_in_probe(["prepare", str(experiment)], tmp_path, counting, "'loads:', loads")
    assert done.returncode == 0, done.stderr[-3000:]
    assert last == "loads: ['sftdag-tokenizer-load']"
