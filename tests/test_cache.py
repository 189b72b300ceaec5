"""Every stage's key follows its inputs: same inputs → no recompute; each input change → new key."""

import json
import shutil
from pathlib import Path

import pytest

from trainer.core import store as store_module
from trainer.data.prepare import DataPipeline

from .conftest import small_rows, write_jsonl

STAGES = ("raw", "templated", "tokenized", "packed")


def keys(exp) -> dict[str, str]:
    """{"<stage>/<split>": key} from a fresh pipeline (as a new process would compute them)."""
    p = DataPipeline(exp, progress=False)
    return {f"{s}/{split}": p.key(s, split) for split in p.splits() for s in STAGES}


def test_same_inputs_no_recompute_same_keys(make_experiment):
    exp = make_experiment()
    first = DataPipeline(exp, progress=False).run()
    assert not any(o.cache_hit for name, o in first.items() if name != "tokenizer")
    second = DataPipeline(make_experiment(name="other_experiment"), progress=False).run()
    assert all(o.cache_hit for o in second.values())
    assert {n: o.key for n, o in first.items()} == {n: o.key for n, o in second.items()}


def test_training_settings_do_not_change_data_keys(make_experiment):
    assert keys(make_experiment()) == keys(make_experiment(training={"learning_rate": 0.1, "max_steps": 3}))


ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def assert_first_changed(before: dict, after: dict, first_changed: dict) -> None:
    """Per split: stages upstream of `first_changed[split]` keep their key, it and every stage
    downstream get a new one (None: the split is untouched)."""
    assert before.keys() == after.keys()
    for split in {name.split("/")[1] for name in before}:
        index = STAGES.index(first_changed[split]) if first_changed.get(split) else len(STAGES)
        for stage in STAGES[:index]:
            assert before[f"{stage}/{split}"] == after[f"{stage}/{split}"], f"{stage}/{split} should not change"
        for stage in STAGES[index:]:
            assert before[f"{stage}/{split}"] != after[f"{stage}/{split}"], f"{stage}/{split} should change"


# (baseline data settings, the one change, first stage whose key must change)
DATA_SETTINGS = [
    ({}, {"max_length": 64}, "packed"),
    ({}, {"packing": "wrapped"}, "packed"),
    ({}, {"overlong": "split"}, "packed"),
    ({}, {"truncate_side": "keep_end"}, "packed"),
    ({}, {"rows_per_shard": 4}, "packed"),
    ({}, {"masking": "all"}, "templated"),
    ({}, {"template": {"source": "zephyr.jinja"}}, "templated"),
    ({}, {"fields": {"prompt": "question"}}, "templated"),
    ({}, {"fields": {"content": "text"}}, "templated"),
    ({}, {"response_template": "Answer:"}, "templated"),
    ({"response_template": "Answer:"}, {"instruction_template": "What"}, "templated"),
    ({}, {"empty_assistant_turns": "keep"}, "templated"),
    # zephyr's <|user|> markers are not tokens of the tiny tokenizer: add_markers adds them.
    ({"template": {"source": "zephyr.jinja"}}, {"template": {"add_markers": True}}, "templated"),
    ({"template": {"source": "zephyr.jinja"}}, {"template": {"add_markers": ["<|user|>"]}}, "templated"),
]


@pytest.mark.parametrize("base, change, first_changed", DATA_SETTINGS,
                         ids=[json.dumps(c, sort_keys=True) for _, c, _ in DATA_SETTINGS])
def test_each_data_setting_changes_its_stage_and_downstream(make_experiment, tmp_path, base, change, first_changed):
    (tmp_path / "zephyr.jinja").write_text(ZEPHYR)
    # The baseline first: its tokenizer identity is then remembered in the store, as in real use.
    before = keys(make_experiment(data=base))
    after = keys(make_experiment(data=merged(base, change)))
    assert_first_changed(before, after, {"train": first_changed})
    assert keys(make_experiment(data=base)) == before  # and back: nothing else moved


EVAL_SETTINGS = [
    ({"fraction": 0.25}, {"fraction": 0.5}, {"train": "raw", "eval": "raw"}),
    ({"fraction": 0.25}, {"seed": 1}, {"train": "raw", "eval": "raw"}),
    ({"fraction": 0.25}, {"pack": False}, {"eval": "packed"}),
    ({"source": {"path": "data/eval_a.jsonl"}}, {"source": {"path": "data/eval_b.jsonl"}}, {"eval": "raw"}),
    ({"source": {"path": "data/eval_a.jsonl"}}, {"pack": False}, {"eval": "packed"}),
]


@pytest.mark.parametrize("base, change, first_changed", EVAL_SETTINGS,
                         ids=[json.dumps(c, sort_keys=True) for _, c, _ in EVAL_SETTINGS])
def test_each_eval_setting_changes_its_split_and_stage(make_experiment, tmp_path, base, change, first_changed):
    write_jsonl(tmp_path / "data" / "eval_a.jsonl", small_rows(8, seed=1))
    write_jsonl(tmp_path / "data" / "eval_b.jsonl", small_rows(8, seed=2))
    exp = make_experiment(data={"source": {"path": "data/train.jsonl"}, "eval": base})
    before = keys(exp)
    assert set(before) == {f"{s}/{split}" for s in STAGES for split in ("train", "eval")}
    after = keys(make_experiment(data={"source": {"path": "data/train.jsonl"}, "eval": merged(base, change)}))
    assert_first_changed(before, after, first_changed)


def test_data_file_content_changes_every_key(make_experiment, tmp_path):
    before = keys(make_experiment())
    rows = small_rows()
    rows[3] = {"prompt": "What is 1 + 1?\nAnswer:", "completion": " 2"}
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    after = keys(make_experiment())
    assert all(before[s] != after[s] for s in before)


def test_tokenizer_identity_not_name_enters_the_key(make_experiment, tmp_path):
    import shutil

    from trainer.data.tokenizer_loading import load_tokenizer
    from trainer.core.config import TokenizerConfig

    tok = load_tokenizer(TokenizerConfig(path="builtin:tiny"))
    same = tmp_path / "tok_copy"
    tok.save_pretrained(same)
    assert keys(make_experiment()) == keys(make_experiment(tokenizer={"path": str(same)}))
    changed = tmp_path / "tok_changed"
    shutil.copytree(same, changed)
    tok2 = load_tokenizer(TokenizerConfig(path=str(changed)))
    tok2.add_tokens(["<extra_token>"])
    tok2.save_pretrained(changed)
    after = keys(make_experiment(tokenizer={"path": str(changed)}))
    assert_first_changed(keys(make_experiment()), after, {"train": "templated"})


def test_same_bytes_same_key_whatever_the_setting_is_called(make_experiment):
    # The tiny tokenizer has no chat template, so `tokenizer` sets up ChatML: identical bytes.
    assert keys(make_experiment()) == keys(make_experiment(data={"template": {"source": "chatml"}}))


def test_code_version_changes_the_key(make_experiment, monkeypatch):
    before = keys(make_experiment())
    monkeypatch.setitem(store_module.CODE_VERSIONS, "tokenized", "999")
    after = keys(make_experiment())
    assert_first_changed(before, after, {"train": "tokenized"})


def test_rows_in_equals_rows_out_plus_rejects_end_to_end(make_experiment):
    rows = small_rows(30) + [
        "{not json",
        {"messages": [{"role": "bot", "content": "hi"}]},
        {"prompt": "Q", "completion": 5},
        {"unrelated": "field"},
        [1, 2, 3],
    ]
    exp = make_experiment(rows=rows)
    outputs = DataPipeline(exp, progress=False).run()
    rows_in = outputs["raw/train"].manifest["counts"]["rows_in"]
    rejects = sum(outputs[f"{s}/train"].manifest["counts"]["rejects"] for s in STAGES)
    assert rows_in == len(rows) == outputs["packed/train"].manifest["counts"]["rows_out"] + rejects
    assert rejects == 5
    from trainer.data.stages import read_rejects

    raw_rejects = read_rejects(outputs["raw/train"]).to_pylist()
    assert [r["row_id"] for r in raw_rejects] == [30, 34]
    assert "train.jsonl:31" in raw_rejects[0]["reason"] and "invalid JSON" in raw_rejects[0]["reason"]
    assert "expected a JSON object" in raw_rejects[1]["reason"]
    templated_rejects = read_rejects(outputs["templated/train"]).to_pylist()
    assert sorted(r["row_id"] for r in templated_rejects) == [31, 32, 33]



def test_where_selects_rows_end_to_end_and_counts_those_left_out(make_experiment):
    """data.source.where: the selected rows go through every stage (rows in = rows out + rejects
    over them), the ones left out are counted, and the selection has its own key."""
    from trainer.data.prepare import summarize

    rows = [{**r, "topic": "kept" if i % 3 else "other"} for i, r in enumerate(small_rows(30))] + ["{not json"]
    exp = make_experiment(rows=rows, data={"source": {"path": "data/*.jsonl", "where": {"topic": "kept"}}})
    outputs = DataPipeline(exp, progress=False).run()
    counts = outputs["raw/train"].manifest["counts"]
    assert counts["not_selected"] == 10 and counts["rows_in"] == 21 and counts["rejects"] == 1
    rejects = sum(outputs[f"{s}/train"].manifest["counts"]["rejects"] for s in STAGES)
    assert counts["rows_in"] == outputs["packed/train"].manifest["counts"]["rows_out"] + rejects
    assert summarize(outputs)["not_selected"] == 10
    everything = DataPipeline(make_experiment(rows=rows), progress=False).run()
    assert everything["raw/train"].key != outputs["raw/train"].key
    assert "not_selected" not in everything["raw/train"].manifest["counts"]

# -- files edited in place, in one long-lived process (defect 7) ---------------------------------

def templated_texts(output) -> list[str]:
    from trainer.data.stages import read_rows

    return read_rows(output).column("text").to_pylist()


def chat_rows() -> list[dict]:
    return [r for r in small_rows() if "messages" in r]  # (string prompt/completion is not templated)


def fresh_identity(exp) -> str:
    """The identity of the set-up tokenizer loaded from the files as they are now (no cache)."""
    from trainer.data.templating import setup_template
    from trainer.data.tokenizer_loading import load_tokenizer, tokenizer_identity

    tok = load_tokenizer(exp.tokenizer, exp.base_dir)
    setup_template(tok, exp.data.template, exp.base_dir)
    return tokenizer_identity(tok)


def remembered_identity(exp) -> str:
    """The identity the store remembers for the tokenizer files as they are now."""
    from trainer.data.prepare import _tokenizer_source_digest

    return (Path(exp.store_root) / "tokenizer" / ".identity" / _tokenizer_source_digest(exp).digest).read_text()


def test_template_file_edited_in_place_is_a_new_tokenizer(make_experiment, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(ZEPHYR)
    exp = make_experiment(data={"template": {"source": "chat.jinja"}}, rows=chat_rows())
    first = DataPipeline(exp, progress=False).run()
    assert all("<|user|>\n" in t for t in templated_texts(first["templated/train"]))

    template.write_text(ZEPHYR.replace("<|{{ m['role'] }}|>", "### {{ m['role'] }}:"))
    second = DataPipeline(make_experiment(data={"template": {"source": "chat.jinja"}}), progress=False).run()
    assert second["templated/train"].key != first["templated/train"].key
    assert not second["templated/train"].cache_hit
    texts = templated_texts(second["templated/train"])
    assert all("### user:\n" in t and "<|user|>" not in t for t in texts)
    assert remembered_identity(exp) == fresh_identity(exp) == second["tokenizer"].key
    # and a third process (fresh pipeline) serves the new rendering from the store
    third = DataPipeline(make_experiment(data={"template": {"source": "chat.jinja"}}), progress=False).run()
    assert {n: o.key for n, o in third.items()} == {n: o.key for n, o in second.items()}


def test_local_tokenizer_directory_edited_in_place(make_experiment, tmp_path):
    from trainer.data.tokenizer_loading import TINY_TOKENIZER_DIR

    tok_dir = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER_DIR, tok_dir)
    exp = make_experiment(tokenizer={"path": "tok"}, rows=chat_rows())
    first = DataPipeline(exp, progress=False).run()
    # The tiny tokenizer has no chat template: ChatML is set up.
    assert all("<|im_start|>user\n" in t for t in templated_texts(first["templated/train"]))

    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>\n{% endfor %}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    second = DataPipeline(make_experiment(tokenizer={"path": "tok"}), progress=False).run()
    assert second["templated/train"].key != first["templated/train"].key
    assert all("[user] " in t and "<|im_start|>" not in t for t in templated_texts(second["templated/train"]))
    assert remembered_identity(exp) == fresh_identity(exp) == second["tokenizer"].key


def test_shipped_template_by_name_is_digested_by_content(make_experiment, tmp_path, monkeypatch):
    from trainer.data import tokenizer_loading as tokenizer_module

    # A copy of the shipped templates stands for a new release of them under the same names.
    shipped = tmp_path / "templates"
    shutil.copytree(tokenizer_module.TEMPLATES_DIR, shipped)
    monkeypatch.setattr(tokenizer_module, "TEMPLATES_DIR", shipped)
    (shipped / "mine.jinja").write_text(ZEPHYR)
    exp = make_experiment(data={"template": {"source": "mine"}}, rows=chat_rows())
    first = DataPipeline(exp, progress=False).run()
    assert all("<|user|>\n" in t for t in templated_texts(first["templated/train"]))

    (shipped / "mine.jinja").write_text(ZEPHYR.replace("<|{{ m['role'] }}|>", "### {{ m['role'] }}:"))
    second = DataPipeline(make_experiment(data={"template": {"source": "mine"}}), progress=False).run()
    assert second["templated/train"].key != first["templated/train"].key
    assert all("### user:\n" in t for t in templated_texts(second["templated/train"]))
    assert remembered_identity(exp) == fresh_identity(exp)


def test_template_edited_between_keys_and_build_renders_with_the_keyed_tokenizer(make_experiment, tmp_path):
    from trainer.data.stages import read_rows

    template = tmp_path / "chat.jinja"
    template.write_text(ZEPHYR)
    DataPipeline(make_experiment(data={"template": {"source": "chat.jinja"}}), progress=False).run()
    # A new masking: a templated key not built yet, computed with the remembered identity.
    p = DataPipeline(make_experiment(data={"template": {"source": "chat.jinja"}, "masking": "all"}), progress=False)
    key = p.key("templated", "train")
    template.write_text(ZEPHYR.replace("<|{{ m['role'] }}|>", "### {{ m['role'] }}:"))
    # The stage renders with the tokenizer its key names (stored under that identity), never
    # with the edited file: what is under the key is what the key says.
    out = p.templated("train")
    assert out.key == key
    texts = read_rows(out).column("text").to_pylist()
    assert any("<|user|>" in t for t in texts if t) and not any("### user:" in t for t in texts if t)


@pytest.fixture
def library_version(monkeypatch):
    """Set a library's __version__ as an upgrade would; the set-up digest is recomputed around it."""
    from trainer.data.prepare import _setup_code_digest

    def set_version(module, version):
        monkeypatch.setattr(module, "__version__", version)
        _setup_code_digest.cache_clear()

    yield set_version
    _setup_code_digest.cache_clear()  # runs before monkeypatch restores the version: recomputed later


@pytest.mark.parametrize("library", ["transformers", "tokenizers"])
def test_tokenization_library_version_changes_templated_and_downstream(make_experiment, library_version, library):
    import importlib

    before = keys(make_experiment())
    library_version(importlib.import_module(library), "0.0.0+upgraded")
    after = keys(make_experiment())
    assert_first_changed(before, after, {"train": "templated"})


def test_formatting_func_module_edited_in_place(make_experiment, tmp_path, monkeypatch, request):
    import os
    import py_compile
    import sys
    import uuid

    from trainer.data.record_formats import load_formatting_func

    name = f"fmt_{uuid.uuid4().hex[:12]}"
    module = tmp_path / "funcs" / f"{name}.py"
    module.parent.mkdir()
    module.write_text("def fmt(record):\n    return 'Q: ' + record['answer']\n")
    py_compile.compile(str(module), doraise=True)  # a bytecode cache, whatever PYTHONDONTWRITEBYTECODE says
    written = module.stat()
    monkeypatch.syspath_prepend(str(module.parent))
    request.addfinalizer(lambda: (sys.modules.pop(name, None), load_formatting_func.cache_clear()))
    data = {"format": "formatting_func", "formatting_func": f"{name}:fmt"}

    first = DataPipeline(make_experiment(data=data), progress=False).run()
    assert all(t.startswith("Q: ") for t in templated_texts(first["templated/train"]))
    assert keys(make_experiment(data=data))["templated/train"] == first["templated/train"].key

    # Same size and modification time: neither the bytecode cache nor linecache notices.
    module.write_text("def fmt(record):\n    return 'R: ' + record['answer']\n")
    os.utime(module, ns=(written.st_atime_ns, written.st_mtime_ns))
    second = DataPipeline(make_experiment(data=data), progress=False).run()
    assert second["raw/train"].key == first["raw/train"].key
    assert second["templated/train"].key != first["templated/train"].key
    assert all(t.startswith("R: ") for t in templated_texts(second["templated/train"]))

    # Edited after a pipeline was made: it refuses rather than file old code's rows under a new key.
    late = DataPipeline(make_experiment(data={**data, "masking": "all"}), progress=False)
    module.write_text("def fmt(record):\n    return 'S: ' + record['answer']\n")
    with pytest.raises(RuntimeError, match="changed while preparing"):
        late.templated("train")
    third = DataPipeline(make_experiment(data={**data, "masking": "all"}), progress=False).run()
    assert all(t.startswith("S: ") for t in templated_texts(third["templated/train"]))


# -- keys of stores already written ---------------------------------------------------------------

PINNED_ROWS = [{"prompt": f"What is {i} + {i}?\nAnswer:", "completion": f" {2 * i}"} for i in range(8)]
# Passed in as the tokenizer's key: no tokenizer (and so no library version) enters these keys.
PINNED_TOKENIZER = "0" * 64
# [raw, templated, tokenized, packed], since raw 3 and templated 5 (a byte-order mark read as data,
# a reject's reason: every stage rebuilt once, on purpose; before, since templated 4)
PINNED_KEYS = {
    "train": ["1d55e7bab7f16b6e51a6", "f771d9f65a27721c3d10", "e611dd4799cad08d949e", "d1a6aea7f3bcb0e9dbda"],
    "eval": ["3640ff88803792cfa363", "ac9eee03e279480b227f", "0f36ccb0af2ffbcfa309", "3bf26dafd90ae2f748a2"],
}


def test_keys_of_existing_stores_do_not_change(make_experiment):
    """A store filled by earlier code is found by this code: for fixed rows, settings and tokenizer
    identity, every stage's key is the one written before (a change here orphans every store)."""
    p = DataPipeline(make_experiment(rows=PINNED_ROWS, data={"eval": {"fraction": 0.25}}), progress=False)
    got = {}
    for split in p.splits():
        raw = p.raw_key(split)
        templated = p.key("templated", split, raw=raw, tokenizer=PINNED_TOKENIZER)
        tokenized = p.key("tokenized", split, templated=templated, tokenizer=PINNED_TOKENIZER)
        got[split] = [raw, templated, tokenized, p.key("packed", split, tokenized=tokenized)]
    assert got == PINNED_KEYS


def test_cached_run_hashes_the_source_once_and_loads_no_tokenizer(make_experiment, monkeypatch):
    from trainer.data import prepare

    exp = make_experiment(data={"eval": {"fraction": 0.25}})
    DataPipeline(exp, progress=False).run()
    hashed = []
    plan = prepare.plan_shards

    def counted(source, base_dir, rows_per_shard):
        hashed.append(source)
        return plan(source, base_dir, rows_per_shard)

    monkeypatch.setattr(prepare, "plan_shards", counted)
    p = DataPipeline(make_experiment(data={"eval": {"fraction": 0.25}}), progress=False)
    outputs = p.run()
    assert all(o.cache_hit for o in outputs.values()) and set(outputs) == {
        "tokenizer", *(f"{s}/{split}" for s in STAGES for split in ("train", "eval"))}
    assert len(hashed) == 1  # train and the eval split carved out of it share one source
    assert "tokenizer_bundle" not in p.__dict__  # the identity was read from the store, nothing loaded


def test_a_stage_given_its_inputs_computes_nothing_upstream(make_experiment, monkeypatch):
    """As a Dagster asset runs it: given its inputs' outputs, a stage neither hashes the source nor
    works out the tokenizer again, and files its output under the key a full run gives it."""
    from trainer.data import prepare

    first = DataPipeline(make_experiment(), progress=False).run()
    changed = make_experiment(data={"max_length": 64, "masking": "all"})
    expected = keys(changed)

    def not_again(source, base_dir, rows_per_shard):
        raise AssertionError("the source was hashed again")

    monkeypatch.setattr(prepare, "plan_shards", not_again)
    p = DataPipeline(changed, progress=False)
    templated = p.templated("train", raw=first["raw/train"], tokenizer=first["tokenizer"])
    tokenized = p.tokenized("train", templated=templated, tokenizer=first["tokenizer"])
    packed = p.packed("train", tokenized=tokenized)
    assert not templated.cache_hit and not packed.cache_hit
    assert [templated.key, tokenized.key, packed.key] == [expected[f"{s}/train"] for s in STAGES[1:]]
    assert "tokenizer_identity" not in p.__dict__


def test_a_fresh_preparation_loads_its_tokenizer_once_beside_the_raw_shards(make_experiment, monkeypatch):
    """New raw shards to build: the tokenizer loads in the background while they are built, once,
    and the pipeline (or a Dagster asset's own pipeline after it) takes that load; the keys are
    those of a pipeline that loads it itself. With the raw shards in the store, nothing loads early."""
    import threading

    from trainer.data import prepare

    loads = []
    load = prepare._load_tokenizer_bundle

    def counted(exp):
        loads.append(threading.current_thread().name)
        return load(exp)

    monkeypatch.setattr(prepare, "_load_tokenizer_bundle", counted)
    exp = make_experiment(data={"eval": {"fraction": 0.25}})
    outputs = DataPipeline(exp, progress=False).run()
    assert loads == ["sftdag-tokenizer-load"]
    assert not prepare._BACKGROUND_LOADS  # taken, not left behind
    assert {n: o.key for n, o in outputs.items() if n != "tokenizer"} == keys(exp)
    assert outputs["tokenizer"].key == fresh_identity(exp)

    # raw in the store, a new template setting: the tokenizer loads when templated needs it
    loads.clear()
    # stage by stage, as a Dagster step in a process of its own: nothing loads early
    fresh = make_experiment(data={"eval": {"fraction": 0.25}}, store=str(Path(exp.base_dir) / "other-store"))
    DataPipeline(fresh, progress=False).raw("train")
    assert loads == [] and not prepare._BACKGROUND_LOADS
    DataPipeline(make_experiment(data={"eval": {"fraction": 0.25}, "template": {"add_markers": True}}),
                 progress=False).run()
    assert loads == [threading.current_thread().name]


def test_a_background_load_of_other_tokenizer_files_is_not_taken(make_experiment, tmp_path):
    """A load started before the files changed (its bundle made from other files than those the
    pipeline finds) is dropped and the tokenizer loaded again: the key names the files there now."""
    from concurrent.futures import Future

    from trainer.data import prepare

    template = tmp_path / "chat.jinja"
    template.write_text(ZEPHYR)
    exp = make_experiment(data={"template": {"source": "chat.jinja"}}, rows=chat_rows())
    stale = prepare._load_tokenizer_bundle(exp)
    template.write_text(ZEPHYR.replace("<|{{ m['role'] }}|>", "### {{ m['role'] }}:"))
    now = prepare._tokenizer_source_digest(exp)
    assert stale.digest != now.digest
    loading = Future()
    loading.set_result(stale)
    prepare._BACKGROUND_LOADS[now.digest] = loading  # as if it had been started under today's digest
    outputs = DataPipeline(make_experiment(data={"template": {"source": "chat.jinja"}}), progress=False).run()
    assert outputs["tokenizer"].key == fresh_identity(exp) != stale.identity
    assert all("### user:\n" in t for t in templated_texts(outputs["templated/train"]))
