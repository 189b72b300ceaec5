"""Every stage's key follows its inputs: same inputs → no recompute; each input change → new key."""

import json

import pytest

from trainer import store as store_module
from trainer.prepare import DataPipeline

from .conftest import small_rows, write_jsonl

STAGES = ("raw", "templated", "tokenized", "packed")


def keys(exp):
    p = DataPipeline(exp, progress=False)
    return {s: getattr(p, f"{s}_key")("train") for s in STAGES}


def test_same_inputs_no_recompute_same_keys(make_experiment):
    exp = make_experiment()
    first = DataPipeline(exp, progress=False).run()
    assert not any(o.cache_hit for name, o in first.items() if name != "tokenizer")
    second = DataPipeline(make_experiment(name="other_experiment"), progress=False).run()
    assert all(o.cache_hit for o in second.values())
    assert {n: o.key for n, o in first.items()} == {n: o.key for n, o in second.items()}


def test_training_settings_do_not_change_data_keys(make_experiment):
    assert keys(make_experiment()) == keys(make_experiment(training={"learning_rate": 0.1, "max_steps": 3}))


@pytest.mark.parametrize("change, first_changed", [
    ({"max_length": 64}, "packed"),
    ({"packing": "wrapped"}, "packed"),
    ({"overlong": "split"}, "packed"),
    ({"masking": "all"}, "templated"),
    ({"template": {"source": "zephyr.jinja"}}, "templated"),
])
def test_each_data_setting_changes_its_stage_and_downstream(make_experiment, tmp_path, change, first_changed):
    (tmp_path / "zephyr.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    before, after = keys(make_experiment()), keys(make_experiment(data=change))
    index = STAGES.index(first_changed)
    for stage in STAGES[:index]:
        assert before[stage] == after[stage], stage
    for stage in STAGES[index:]:
        assert before[stage] != after[stage], stage


def test_data_file_content_changes_every_key(make_experiment, tmp_path):
    before = keys(make_experiment())
    rows = small_rows()
    rows[3] = {"prompt": "What is 1 + 1?\nAnswer:", "completion": " 2"}
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    after = keys(make_experiment())
    assert all(before[s] != after[s] for s in STAGES)


def test_tokenizer_identity_not_name_enters_the_key(make_experiment, tmp_path):
    import shutil

    from trainer.tokenizer import load_tokenizer
    from trainer.config import TokenizerConfig

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
    assert after["raw"] == keys(make_experiment())["raw"]
    assert after["templated"] != keys(make_experiment())["templated"]


def test_same_bytes_same_key_whatever_the_setting_is_called(make_experiment):
    # The tiny tokenizer has no chat template, so `tokenizer` sets up ChatML: identical bytes.
    assert keys(make_experiment()) == keys(make_experiment(data={"template": {"source": "chatml"}}))


def test_code_version_changes_the_key(make_experiment, monkeypatch):
    before = keys(make_experiment())
    monkeypatch.setitem(store_module.CODE_VERSIONS, "tokenized", "999")
    after = keys(make_experiment())
    assert before["templated"] == after["templated"]
    assert before["tokenized"] != after["tokenized"] and before["packed"] != after["packed"]


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
    from trainer.prepare import read_rejects

    raw_rejects = read_rejects(outputs["raw/train"]).to_pylist()
    assert [r["row_id"] for r in raw_rejects] == [30, 34]
    assert "train.jsonl:31" in raw_rejects[0]["reason"] and "invalid JSON" in raw_rejects[0]["reason"]
    assert "expected a JSON object" in raw_rejects[1]["reason"]
    templated_rejects = read_rejects(outputs["templated/train"]).to_pylist()
    assert sorted(r["row_id"] for r in templated_rejects) == [31, 32, 33]
