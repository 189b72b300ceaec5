"""Sources cut into shards: the same rows, rejects and packed shards however a source is cut and
however many processes build it; a grown source prepares only its new shards; a shard that
fails leaves nothing that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.core.arrow_io import read_shards
from trainer.core.config import experiment_from_dict
from trainer.data.prepare import DataPipeline
from trainer.data.shards import jsonl_shards
from trainer.data.sources import SourceError
from trainer.data.stages import read_rejects, read_rows

from .conftest import small_rows, write_jsonl

STAGES = ("raw", "templated", "tokenized", "packed")


def experiment(tmp_path: Path, store: str, **data):
    return experiment_from_dict({
        "name": "shards", "store": str(tmp_path / store),
        "data": {"source": {"path": "data/*.jsonl"}, "max_length": 96, "rows_per_shard": 8, **data},
        "tokenizer": {"path": "builtin:tiny"}}, base_dir=tmp_path)


def mixed_rows(n: int, seed: int = 0) -> list:
    """Ordinary rows with, among them, a malformed line, a row with nothing to train, a blank line
    and a row longer than max_length: every stage has something to reject or cut."""
    rows: list = list(small_rows(n, seed=seed))
    rows[3] = "{broken"
    rows[7] = {"messages": [{"role": "user", "content": "no answer"}]}
    rows[11] = ""
    rows[13] = {"prompt": "long " * 40, "completion": " answer " * 60}
    return rows


def everything(outputs: dict) -> dict:
    """What a user gets from a preparation: packed rows, every stage's rejects and counts, held-out prompts."""
    got = {}
    for name, out in outputs.items():
        if name == "tokenizer":
            continue
        stage = name.split("/")[0]
        got[name] = {"counts": out.manifest["counts"], "rejects": read_rejects(out).to_pylist()}
        if stage == "packed":
            got[name]["rows"] = read_shards(out.path).to_pylist()
        else:
            got[name]["rows"] = read_rows(out).to_pylist()
    if "templated/eval" in outputs:
        got["held_out"] = (outputs["templated/eval"].path / "held_out.jsonl").read_text()
    return got


def test_the_same_data_however_the_source_is_cut_and_however_many_processes_build_it(tmp_path):
    rows = mixed_rows(70)
    write_jsonl(tmp_path / "data" / "a.jsonl", rows[:45])
    write_jsonl(tmp_path / "data" / "b.jsonl", rows[45:])
    whole = DataPipeline(experiment(tmp_path, "one", num_proc=1, eval={"fraction": 0.2}), progress=False).run()
    cut = DataPipeline(experiment(tmp_path, "many", num_proc=2, source_rows_per_shard=6, eval={"fraction": 0.2}),
                       progress=False).run()
    assert len(cut["raw/train"].manifest["shards"]) == 8 + 5  # 45 lines every 6, 25 lines every 6
    assert [s["label"] for s in cut["raw/train"].manifest["shards"]][:2] == ["a.jsonl:1-6", "a.jsonl:7-12"]
    assert len(whole["raw/train"].manifest["shards"]) == 2
    assert everything(cut) == everything(whole)

    got = everything(whole)
    raw_rejects = got["raw/train"]["rejects"]
    assert raw_rejects == [{"row_id": 3, "stage": "raw", "reason": raw_rejects[0]["reason"]}]
    assert raw_rejects[0]["reason"].startswith("malformed record at a.jsonl:4: invalid JSON")
    assert {r["row_id"] for r in got["templated/train"]["rejects"] + got["templated/eval"]["rejects"]} == {7}
    # rows in = rows out + rejects, at every stage, summed over the shards; splits share row numbers
    for split in ("train", "eval"):
        for stage in STAGES:
            c = got[f"{stage}/{split}"]["counts"]
            assert c["rows_in"] == c["rows_out"] + c["rejects"], (stage, split, c)
        assert got[f"raw/{split}"]["counts"]["rows_in"] > 0
    assert (got["raw/train"]["counts"]["rows_in"] + got["raw/eval"]["counts"]["rows_in"]) == len(rows) - 1  # blank
    train_ids = {r["row_id"] for r in got["raw/train"]["rows"]}
    eval_ids = {r["row_id"] for r in got["raw/eval"]["rows"]}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == len(rows) - 2  # blank, malformed
    held = [json.loads(line) for line in got["held_out"].splitlines()]
    assert {h["row_id"] for h in held} <= eval_ids and len(held) > 0


def shard_keys(output) -> list[str]:
    return [s["key"] for s in output.manifest["shards"]]


def built(store: Path, stage: str) -> set[str]:
    return {p.name for p in (store / stage).iterdir() if (p / "manifest.json").is_file()}


def test_a_grown_source_prepares_only_its_new_shards(tmp_path):
    rows = small_rows(60, seed=1)
    data = tmp_path / "data" / "a.jsonl"
    write_jsonl(data, rows[:30])
    exp = experiment(tmp_path, "store", source_rows_per_shard=10, num_proc=1)
    before = DataPipeline(exp, progress=False).run()
    store = tmp_path / "store"
    existing = {stage: built(store, stage) for stage in STAGES[:3]}

    with open(data, "a") as f:  # rows appended to the end of the file
        f.writelines(json.dumps(r) + "\n" for r in rows[30:35])
    grown = DataPipeline(experiment(tmp_path, "store", source_rows_per_shard=10, num_proc=1), progress=False).run()
    for stage in STAGES[:3]:
        old, new = shard_keys(before[f"{stage}/train"]), shard_keys(grown[f"{stage}/train"])
        assert new[:3] == old and len(new) == 4, stage
        # built now: the new shard and the split's new index, nothing else
        assert built(store, stage) - existing[stage] == {new[3], grown[f"{stage}/train"].key}, stage
    assert not grown["packed/train"].cache_hit
    from trainer.data.prepare import summarize

    assert summarize(grown)["shards_built"] == {"raw": "1 of 4", "templated": "1 of 4", "tokenized": "1 of 4"}

    # A file added before the others (in glob order) is its own shards: the others keep theirs.
    write_jsonl(tmp_path / "data" / "0.jsonl", rows[35:60])
    again = DataPipeline(experiment(tmp_path, "store", source_rows_per_shard=10, num_proc=1), progress=False).run()
    assert shard_keys(again["tokenized/train"])[3:] == shard_keys(grown["tokenized/train"])
    # ... and the result is what a preparation from scratch gives
    fresh = DataPipeline(experiment(tmp_path, "fresh", source_rows_per_shard=10, num_proc=2), progress=False).run()
    assert everything(fresh) == everything(again)


def test_jsonl_shards_cover_the_file_exactly_and_keep_their_digest_when_it_grows(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [b'{"text": "%d"}\n' % i for i in range(23)]
    lines[4] = b"\n"
    lines[9] = b'{"text": "crlf"}\r\n'
    path.write_bytes(b"".join(lines) + b'{"text": "last, no newline"}')
    shards = jsonl_shards(path, 5)
    assert [s.label for s in shards] == ["a.jsonl:1-5", "a.jsonl:6-10", "a.jsonl:11-15", "a.jsonl:16-20",
                                         "a.jsonl:21-24"]
    assert shards[0].start == 0 and shards[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
    data = path.read_bytes()
    assert b"".join(data[s.start:s.end] for s in shards) == data
    with open(path, "ab") as f:
        f.write(b'\n{"text": "more"}\n')
    grown = jsonl_shards(path, 5)
    assert grown[:4] == shards[:4] and grown[4].label == "a.jsonl:21-25" and grown[4].digest != shards[4].digest


def test_invalid_utf8_is_a_reject_naming_its_line(tmp_path):
    data = tmp_path / "data" / "a.jsonl"
    write_jsonl(data, small_rows(10))
    with open(data, "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n')
    out = DataPipeline(experiment(tmp_path, "store"), progress=False).run()
    rejects = read_rejects(out["raw/train"]).to_pylist()
    assert [(r["row_id"], r["reason"]) for r in rejects] == [(10, "malformed record at a.jsonl:11: invalid UTF-8 (column 14)")]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_shard_that_fails_leaves_nothing_that_looks_complete(tmp_path, num_proc):
    data = tmp_path / "data" / "a.jsonl"
    rows = small_rows(30, seed=2)
    write_jsonl(data, rows)
    pipeline = DataPipeline(experiment(tmp_path, "store", source_rows_per_shard=10, num_proc=num_proc),
                            progress=False)
    pipeline.raw_key("train")  # planned: the shards' bytes are hashed
    lines = data.read_text().splitlines(keepends=True)
    lines[14] = lines[14].replace('"', "'", 2)  # the second shard's bytes change before it is read
    data.write_text("".join(lines))
    with pytest.raises(SourceError, match=r"a\.jsonl: lines 11-20 changed while being prepared; run again"):
        pipeline.run()
    store = tmp_path / "store" / "raw"
    assert not list(store.glob(".tmp-*"))  # the failed build removed its temporary directory
    complete = {json.loads((p / "manifest.json").read_text()).get("shard") for p in store.iterdir()
                if (p / "manifest.json").is_file()}
    assert "a.jsonl:11-20" not in complete and len(complete) <= 2  # the other shards may be done, correctly
    # Run again: it plans the new bytes and finishes, reusing the shards that did not change.
    out = DataPipeline(experiment(tmp_path, "store", source_rows_per_shard=10, num_proc=num_proc),
                       progress=False).run()
    assert out["raw/train"].manifest["counts"]["rows_in"] == 30


def test_a_script_without_a_main_guard_stops_with_the_reason_instead_of_hanging(tmp_path):
    """Spawned workers import the script that started them: one that prepares data at import would
    prepare again in each worker and wait for its parent's locks for ever."""
    import subprocess
    import sys

    write_jsonl(tmp_path / "data" / "a.jsonl", small_rows(30))
    script = tmp_path / "prepare_here.py"
    script.write_text(
        "from trainer.core.config import experiment_from_dict\n"
        "from trainer.data.prepare import DataPipeline\n"
        f"exp = experiment_from_dict({{'name': 'x', 'store': {str(tmp_path / 'store')!r}, 'data': {{'source': "
        f"{{'path': {str(tmp_path / 'data' / 'a.jsonl')!r}}}, 'source_rows_per_shard': 10, 'num_proc': 2}}}})\n"
        "DataPipeline(exp, progress=False).run()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(
        'put the script\'s work under `if __name__ == "__main__":`'), done.stderr[-2000:]
