"""A fully cached `sftdag prepare` starts fast: it imports no model or tracking library, builds
the assets of the experiment it is given and no other, and still records its Dagster run and every
data asset's materialization (each a cache hit) in the persistent instance."""

import contextlib
import json
import os
import subprocess
import sys

import dagster as dg
import pytest
import yaml

from assets.data import STAGE_ASSETS, data_asset_key, tokenizer_asset_key

from .conftest import small_rows, write_jsonl

# What a cached `prepare` of local data never needs (huggingface_hub: only for a hub id; pyarrow.compute:
# only when a stage builds).
HEAVY = ("torch", "transformers", "peft", "mlflow", "matplotlib", "huggingface_hub", "pyarrow.compute")

# The command in this process; last on stderr, which of HEAVY it imported.
PROBE = ("import json, sys\nfrom pipelines.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
         f"    print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)\n")


def prepare(tmp_path, experiment):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"),
           # What `sftdag ui` would serve: a broken experiment the command must not build.
           "SFTDAG_EXPERIMENTS": str(tmp_path / "others")}
    proc = subprocess.run([sys.executable, "-c", PROBE, "prepare", str(experiment)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("data", [
    {"eval": {"fraction": 0.25}},  # one step per stage, two splits
    {"step_per_shard": True},  # one Dagster step per shard
], ids=["eval_split", "step_per_shard"])
def test_a_cached_prepare_imports_no_model_library_and_records_its_run(tmp_path, data):
    write_jsonl(tmp_path / "data" / "train.jsonl", small_rows(24))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "startup", "store": "store", "tokenizer": {"path": "builtin:tiny"},
        "data": {"name": "startup_data", "source": {"path": "data/*.jsonl"}, "max_length": 128, "rows_per_shard": 8,
                 "checks": {"min_packing_efficiency": 0.5}, **data}}))
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "broken.yaml").write_text("name: broken\ndata:\n  packing: greedy\n")

    first, _ = prepare(tmp_path, experiment)
    second, imported = prepare(tmp_path, experiment)

    assert imported == []
    splits = ["train", "eval"] if "eval" in data else ["train"]
    stages = [f"{stage}/{split}" for stage in STAGE_ASSETS for split in splits]
    assert sorted(second["cache_hits"]) == sorted(stages + ["tokenizer"])
    assert first["cache_hits"] == [] and second["data_version"] == first["data_version"]
    assert all(built.startswith("0 of ") for built in second["shards_built"].values())

    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    try:
        run = instance.get_run_by_id(second["dagster_run_id"])
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        recorded = {r.event_log_entry.asset_materialization.asset_key: r.event_log_entry.asset_materialization.metadata
                    for r in records}
        keys = [tokenizer_asset_key("startup_data")] + [data_asset_key("startup_data", s) for s in STAGE_ASSETS]
        assert sorted(recorded, key=str) == sorted(keys, key=str)
        assert recorded[keys[0]]["cache_hit"].value is True
        for key in keys[1:]:  # a split's metadata is prefixed by its name, the train split's by nothing
            assert [recorded[key][f"{split}_" * (split != "train") + "cache_hit"].value for split in splits] \
                == [True] * len(splits), key
    finally:
        instance.dispose()
    # The connections the command kept open to the instance's SQLite files are closed: their
    # write-ahead logs were checkpointed into the files and removed.
    assert sorted(p.name for p in (tmp_path / "dagster_home").rglob("*.db-wal")) == []


def test_the_event_log_reuses_engines_only_while_dagsters_connect_is_the_one_mirrored(tmp_path):
    """`_engines_reused` replaces a private Dagster method with its own copy of it: only while the
    installed Dagster's method is the one copied (this fails when an upgrade changes it: re-read it
    and update the copy), and never for a storage whose `_connect` is another."""
    import sqlalchemy as db
    from dagster._core.storage.event_log import SqliteEventLogStorage

    from pipelines.sqlite_files import _engines_reused, mirrors_connect

    assert mirrors_connect(SqliteEventLogStorage)
    instance = dg.DagsterInstance.from_config(str(tmp_path))  # no dagster.yaml: SQLite storages under it
    try:
        events = instance.event_log_storage
        assert isinstance(events, SqliteEventLogStorage)

        def engines(storage, shard="a-run"):
            seen = []
            for _ in range(2):
                with storage._connect(shard) as conn:
                    assert conn.execute(db.text("SELECT 1")).scalar() == 1
                    seen.append(conn.engine)
            return seen

        with _engines_reused(events):
            first, second = engines(events)
            assert first is second  # one engine per file while entered
        assert "_connect" not in vars(events)  # Dagster's own method again
        first, second = engines(events)
        assert first is not second

        class Changed(SqliteEventLogStorage):
            @contextlib.contextmanager
            def _connect(self, shard):
                with super()._connect(shard) as conn:
                    yield conn

        assert not mirrors_connect(Changed)
        # Another Dagster's method of the same name and class, another body: left alone too.
        other_version: dict = {}
        exec("import contextlib\nclass SqliteEventLogStorage:\n    @contextlib.contextmanager\n"
             "    def _connect(self, shard):\n        with self._db_lock:\n            yield self.engine_for(shard)\n",
             other_version)
        assert not mirrors_connect(other_version["SqliteEventLogStorage"])
        changed = Changed(events._base_dir)
        with _engines_reused(changed):
            assert "_connect" not in vars(changed)
    finally:
        instance.dispose()
