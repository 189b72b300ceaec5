"""Held-out rows carry what scorers need: what each row asked (as the loop's filters hand it to a
verifier), its task and its source file, written by the templated stage of a real preparation;
the loop's verifier judges them, and is the default scorer of an experiment whose loop names it."""

from __future__ import annotations

import json

import pytest

from trainer.data.default_data import generate
from trainer.data.prepare import DataPipeline
from trainer.data.record_formats import RowError, asked_of, normalize
from trainer.data.stages import read_rows, source_label
from trainer.training.evaluate import load_held_out
from trainer.training.scorers import ERROR, PASS, build_scorers, experiment_scorers, score_answers, scorer_specs

from .conftest import write_jsonl

# Rows of every kind the held-out stage writes, beside the builtin data's prompt/completion and messages rows.
CONVERSATIONAL_PC = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
                     "completion": [{"role": "assistant", "content": "hi"}]}
NO_TASK = {"prompt": "Name a colour.\nAnswer:", "completion": " red"}
TASK_NOT_TEXT = {"messages": [{"role": "user", "content": "One more?"}, {"role": "assistant", "content": "yes"}],
                 "task": 7}


@pytest.fixture
def prepared(tmp_path, make_experiment):
    """The eval split of two files (the builtin generator's test rows and a few hand-written ones)
    through raw → templated: (held_out.jsonl rows, {row id: (raw record, its file)})."""
    write_jsonl(tmp_path / "evaldata" / "generated.jsonl", generate("test", 24, seed=3))
    write_jsonl(tmp_path / "evaldata" / "written.jsonl", [CONVERSATIONAL_PC, NO_TASK, TASK_NOT_TEXT])
    exp = make_experiment(data={"num_proc": 1, "eval": {"source": {"path": "evaldata/*.jsonl"}}})
    pipeline = DataPipeline(exp, progress=False)
    templated = pipeline.templated("eval")
    raw = read_rows(pipeline.raw("eval")).to_pylist()
    records = {r["row_id"]: (json.loads(r["record"]), r["source"].split(":")[0]) for r in raw}
    rows = [json.loads(line) for line in (templated.path / "held_out.jsonl").read_text().splitlines()]
    assert templated.manifest["held_out_prompts"] == len(rows) == len(raw) == 27
    return rows, records, templated.path / "held_out.jsonl"


def test_held_out_rows_carry_what_was_asked_the_task_and_the_source_file(prepared):
    rows, records, _ = prepared
    kinds = set()
    for row in rows:
        record, file = records[row["row_id"]]
        assert row["source"] == file, row  # the file's name, never the temp folder it is in
        assert ("task" in row) == isinstance(record.get("task"), str) and row.get("task") == (
            record["task"] if isinstance(record.get("task"), str) else None)
        if "messages" in record:
            kinds.add("messages")
            assert record["messages"][-1]["role"] == "assistant"
            assert row["asked"] == record["messages"][:-1] and row["answer_end"] == "<|im_end|>"
        elif isinstance(record["prompt"], str):
            kinds.add("prompt_completion")
            assert row["asked"] == record["prompt"] and row["answer_end"] == "</s>"
            assert row["prompt"].endswith(record["prompt"])  # the rendered prompt: bos + the prompt
        else:
            kinds.add("conversational")
            assert row["asked"] == record["prompt"] and row["answer_end"] == "<|im_end|>"
            assert row["prompt"] != row["asked"]
    assert kinds == {"messages", "prompt_completion", "conversational"}
    assert {row["source"] for row in rows} == {"generated.jsonl", "written.jsonl"}
    # load_held_out keeps them; a file without them still loads (asked: None)
    _, _, path = prepared
    loaded = load_held_out(path)
    assert [(r["asked"], r.get("task"), r["source"]) for r in loaded] == [
        (r["asked"], r.get("task"), r["source"]) for r in rows]
    old = path.parent.parent / "old.jsonl"
    old.write_text(json.dumps({"prompt": "q", "reference": "a"}) + "\n")
    assert load_held_out(old) == [{"prompt": "q", "reference": "a", "asked": None}]


def test_the_loops_verifier_judges_held_out_rows_by_what_they_asked(prepared):
    rows, records, path = prepared
    generated = [r for r in load_held_out(path) if r["source"] == "generated.jsonl"]
    (verifier,) = build_scorers([{"verifier": "trainer.data.default_data:verify"}])
    right = [records[r["row_id"]][0]["answer"] for r in generated]
    report, answers = score_answers([verifier], generated, right)
    assert (report["verifier"]["passed"], report["verifier"]["errors"]) == (len(generated), 0)
    wrong = [a + "0" for a in right]
    report, _ = score_answers([verifier], generated, wrong)
    assert (report["verifier"]["failed"], report["verifier"]["errors"]) == (len(generated), 0)
    # per task: the counts add up to the totals, and the answers keep their task
    half = [a if i % 2 else w for i, (a, w) in enumerate(zip(right, wrong))]
    report, answers = score_answers([verifier], generated, half)
    by_task = report["verifier"]["by_task"]
    assert set(by_task) == {records[r["row_id"]][0]["task"] for r in generated}
    for figure in ("passed", "failed", "errors"):
        assert sum(t[figure] for t in by_task.values()) == report["verifier"][figure]
    for task, t in by_task.items():
        mine = [a for a in answers if a["task"] == task]
        assert t["passed"] == sum(a["outcomes"]["verifier"] == PASS for a in mine)
        assert t["pass_rate"] == pytest.approx(t["passed"] / len(mine))
    # A conversation's rendered prompt is not a question the verifier can read: handed only that
    # (a file from before rows said what they asked), it errs on every conversation.
    conversations = [isinstance(r["asked"], list) for r in generated]
    assert 0 < sum(conversations) < len(generated)
    rendered_only = [{k: v for k, v in r.items() if k != "asked"} for r in generated]
    _, answers = score_answers([verifier], rendered_only, right)
    assert [a["outcomes"]["verifier"] for a in answers] == [ERROR if c else PASS for c in conversations]


def test_scorers_see_asked_and_rendered_prompts_and_a_mix_of_tasks_counts_every_row(tmp_path):
    (tmp_path / "seen.py").write_text("SEEN = []\n\n\ndef keep(sample, text):\n    SEEN.append(sample)\n"
                                      "    return text == 'ok'\n")
    rows = [{"prompt": "<s>q1", "reference": "a", "asked": "q1", "task": "add", "row_id": 4},
            {"prompt": "<s>q2", "reference": "b", "asked": [{"role": "user", "content": "q2"}], "row_id": 5},
            {"prompt": "<s>q3", "reference": "c", "asked": None, "task": "add"}]
    (scorer,) = build_scorers([{"verifier": "seen:keep"}], tmp_path)
    report, answers = score_answers([scorer], rows, ["ok", "no", "ok"])
    seen = scorer.function.__globals__["SEEN"]
    assert [s["prompt"] for s in seen] == ["q1", [{"role": "user", "content": "q2"}], "<s>q3"]
    assert [s["rendered_prompt"] for s in seen] == ["<s>q1", "<s>q2", "<s>q3"]
    assert [(s["row"], s["prompt_id"], s.get("task")) for s in seen] == [(0, 4, "add"), (1, 5, None), (2, 2, "add")]
    assert report["verifier"]["by_task"] == {
        "(no task)": {"pass_rate": 0.0, "passed": 0, "failed": 1, "errors": 0},
        "add": {"pass_rate": 1.0, "passed": 2, "failed": 0, "errors": 0}}
    assert [a.get("task") for a in answers] == ["add", None, "add"]
    # No row with a task: no per-task figures.
    report, _ = score_answers(build_scorers(["exact"]), [{"prompt": "p", "reference": "a"}], ["a"])
    assert "by_task" not in report["exact"]


def test_the_loops_verifier_is_the_default_scorer(tmp_path, make_experiment):
    loop = {"prompts": {"source": {"builtin": "default", "rows": 4}},
            "filters": ["dedup", {"length": {"max_tokens": 9}}, {"verifier": "trainer.data.default_data:verify"}]}
    looped = make_experiment(loop=loop)
    assert scorer_specs(looped) == ([{"verifier": "trainer.data.default_data:verify"}], "loop.filters[2]")
    (scorer,) = experiment_scorers(looped)
    assert scorer.label == "loop.filters[2].verifier 'trainer.data.default_data:verify'"
    assert scorer.id == "verifier"
    # eval.scorers wins; a loop without a verifier, or no loop, is judged by exact match
    given = make_experiment(loop=loop, eval={"scorers": ["exact"]})
    assert scorer_specs(given) == (["exact"], "eval.scorers")
    plain = make_experiment(loop={**loop, "filters": ["dedup"]})
    assert scorer_specs(plain) == (["exact"], "eval.scorers") == scorer_specs(make_experiment())
    # a default verifier that does not import is named as the loop names it
    from trainer.training.scorers import ScorerError

    broken = make_experiment(loop={**loop, "filters": ["dedup", {"verifier": "nowhere:f"}]})
    with pytest.raises(ScorerError, match=r"^loop\.filters\[1\]\.verifier 'nowhere:f': cannot import"):
        experiment_scorers(broken)


def test_asked_of_every_kind_of_row(make_experiment):
    data = make_experiment().data
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"}, {"role": "user", "content": "trailing"}]
    cases = [({"prompt": "q", "completion": "a"}, "q"),
             ({"messages": messages}, messages[:4]),
             ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
              [{"role": "user", "content": "hi"}]),
             (CONVERSATIONAL_PC, CONVERSATIONAL_PC["prompt"]),
             ({"messages": [{"role": "user", "content": "no answer"}]}, None),
             ({"text": "just text"}, None),
             ({"input_ids": [1, 2]}, None)]
    for record, asked in cases:
        assert asked_of(normalize(record, data)) == asked, record
    # The loop's prompts use the same helper: a conversation without an answer is a one-line reject.
    from trainer.loop.rounds import _asked_and_trained

    exp = make_experiment()
    assert _asked_and_trained(exp, {"messages": messages}, "new") == (
        messages[:4], {"messages": messages[:4] + [{"role": "assistant", "content": "new"}]})
    assert _asked_and_trained(exp, {"prompt": "q", "completion": "a"}, "b") == ("q", {"prompt": "q", "completion": "b"})
    with pytest.raises(RowError, match="no assistant turn"):
        _asked_and_trained(exp, {"messages": [{"role": "user", "content": "x"}]}, "y")
    with pytest.raises(RowError, match="text rows cannot be loop prompts"):
        _asked_and_trained(exp, {"text": "x"}, "y")


def test_source_labels_drop_the_line_or_index_only():
    assert [source_label(w) for w in ("a.jsonl:12", "b.csv[3]", "org/set[0]", "default/train[9]", "x:y.jsonl:2",
                                      "odd[name].json[1]", None)] == [
        "a.jsonl", "b.csv", "org/set", "default/train", "x:y.jsonl", "odd[name].json", None]
