"""Keys made of what the data stages read, never of a path's text or a name: a data group names
the resolved files it reads, a local file is keyed by the bytes parsed from it, and a hub
dataset by the commit it is read at."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from trainer.core.config import SourceConfig, experiment_from_dict, load_experiment
from trainer.data.prepare import DataPipeline
from trainer.data.sources import SourceError, hub_commit, plan_shards, shards_fingerprint
from trainer.data.stages import read_rows

from .conftest import small_rows, write_jsonl


# -- 1. the data group names the resolved locations ---------------------------------------------

def write_yaml(folder: Path, name: str, store: Path, **data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    # The same text in every folder (the store too: one absolute store for all).
    path.write_text(json.dumps({"name": name, "store": str(store), "tokenizer": {"path": "builtin:tiny"},
                                "data": {"source": {"path": "train.jsonl"}, **data}}))
    return path


def packed_groups(experiments) -> set[str]:
    from assets.data import data_asset_key
    from pipelines.definitions import build_definitions

    keys = build_definitions(experiments).resolve_asset_graph().get_all_asset_keys()
    return {k.path[0] for k in keys if k == data_asset_key(k.path[0], "packed")}


def test_same_text_in_two_folders_is_two_data_groups(tmp_path):
    write_jsonl(tmp_path / "a" / "train.jsonl", small_rows(10, seed=1))
    write_jsonl(tmp_path / "b" / "train.jsonl", small_rows(10, seed=2))
    a = load_experiment(write_yaml(tmp_path / "a", "a", tmp_path / "store"))
    b = load_experiment(write_yaml(tmp_path / "b", "b", tmp_path / "store"))
    assert a.data_group != b.data_group
    # The UI serves both: each trains on its own file.
    groups = packed_groups([a, b])
    assert len(groups) == 2 and all(g.startswith("data_") for g in groups)


def test_same_settings_in_one_folder_share_a_data_group(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", small_rows(10))
    a = load_experiment(write_yaml(tmp_path, "a", tmp_path / "store"))
    b = load_experiment(write_yaml(tmp_path, "b", tmp_path / "store"))
    assert a.data_group == b.data_group
    assert len(packed_groups([a, b])) == 1


def test_eval_source_template_tokenizer_and_store_are_resolved_names_are_not(tmp_path):
    def group(folder: str, store: str = "store", **data) -> str:
        raw = {"name": "x", "store": store, "tokenizer": {"path": data.pop("tokenizer", "builtin:tiny")},
               "data": {"source": {"builtin": "default"}, **data}}
        return experiment_from_dict(raw, base_dir=tmp_path / folder).data_group

    shared = str(tmp_path / "store")
    for folder in ("a", "b"):
        (tmp_path / folder / "tok").mkdir(parents=True)
        (tmp_path / folder / "chat.jinja").write_text("{{ messages }}")
    # Builtin names, hub ids and shipped templates are the same wherever the YAML is.
    assert group("a", shared) == group("b", shared)
    assert group("a", shared, tokenizer="org/model", template={"source": "chatml"}) == \
        group("b", shared, tokenizer="org/model", template={"source": "chatml"})
    # Paths are read beside the YAML: another folder is other data.
    assert group("a", shared, eval={"source": {"path": "eval/*.jsonl"}}) != \
        group("b", shared, eval={"source": {"path": "eval/*.jsonl"}})
    assert group("a", shared, template={"source": "chat.jinja"}) != \
        group("b", shared, template={"source": "chat.jinja"})
    assert group("a", shared, tokenizer="tok") != group("b", shared, tokenizer="tok")
    assert group("a") != group("b")  # the store, relative to each YAML
    # ... and the same file by two spellings is one group.
    assert group("a", shared, template={"source": "chat.jinja"}) == \
        group("b", shared, template={"source": "../a/chat.jinja"})


# -- 2. a local file is checked against the bytes it was keyed by, when read ---------------------

ROWS = [{"prompt": f"What is {i} + 1?\nAnswer:", "completion": f" {i + 1}"} for i in range(6)]


def write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows))


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_a_file_edited_between_planning_and_reading_is_an_error(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    write_rows(path, ROWS)

    def pipeline(store: str) -> DataPipeline:
        exp = experiment_from_dict({"name": "x", "store": str(tmp_path / store), "tokenizer": {"path": "builtin:tiny"},
                                    "data": {"source": {"path": path.name}, "num_proc": 1}}, base_dir=tmp_path)
        return DataPipeline(exp, progress=False)

    unedited = pipeline("one")
    unedited.raw_key("train")
    assert [json.loads(r) for r in read_rows(unedited.raw("train")).column("record").to_pylist()] == ROWS

    edited = pipeline("two")
    edited.raw_key("train")  # planned: the file's bytes are hashed
    write_rows(path, ROWS[:3] + [{"prompt": "edited", "completion": " yes"}] + ROWS[4:])
    with pytest.raises(SourceError) as e:
        edited.raw("train")
    assert str(e.value) == f"{path}: changed while being prepared; run again"
    assert not any((tmp_path / "two" / "raw").glob("*/manifest.json"))  # nothing stored under the old key


# -- 3. a hub dataset is keyed by the commit it is read at ----------------------------------------

def hub_cache(root: Path, repo: str, refs: dict[str, str]) -> None:
    """The layout huggingface_hub gives its cache: `datasets--org--name/refs/<ref>` holds the commit."""
    folder = root / f"datasets--{repo.replace('/', '--')}"
    for ref, sha in refs.items():
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(sha)
        (folder / "snapshots" / sha).mkdir(parents=True, exist_ok=True)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))  # read when imported
    return root


def hub_shard(tmp_path, **source):
    source = SourceConfig(**source)
    source.validate("data.source")
    shards = plan_shards(source, tmp_path, 10)
    assert len(shards) == 1
    return shards[0], shards_fingerprint(source, shards)


def test_a_hub_dataset_is_keyed_by_its_commit(tmp_path, offline_cache):
    main, v2, pinned = "a" * 40, "b" * 40, "c" * 40
    hub_cache(offline_cache, "org/data", {"main": main, "v2": v2})
    shard, fingerprint = hub_shard(tmp_path, hub="org/data")
    assert shard.label == f"org/data@{main}" and shard.commit == main
    assert main in json.dumps(fingerprint)
    other, other_fingerprint = hub_shard(tmp_path, hub="org/data", revision="v2")
    assert other.commit == v2 and other_fingerprint != fingerprint
    assert hub_commit(SourceConfig(hub="org/data", revision="v2"), cache_dir=offline_cache) == v2
    # A commit is a commit: nothing to look up.
    assert hub_shard(tmp_path, hub="org/data", revision=pinned)[0].commit == pinned
    # The data changed upstream (the cache now holds another commit for main): another key.
    hub_cache(offline_cache, "org/data", {"main": v2})
    assert hub_shard(tmp_path, hub="org/data")[1] != fingerprint


def test_an_unresolvable_hub_revision_is_one_line_naming_the_setting(tmp_path, offline_cache):
    hub_cache(offline_cache, "org/data", {"main": "a" * 40})
    for source in ({"hub": "org/missing"}, {"hub": "org/data", "revision": "v9"}):
        with pytest.raises(SourceError) as e:
            hub_shard(tmp_path, **source)
        message = str(e.value)
        assert message.startswith(f"data.source.hub {source['hub']!r}: ") and "\n" not in message
        assert "offline" in message and str(offline_cache) in message
