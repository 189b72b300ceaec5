"""Scorers: exact, answer_regex and verifier, one protocol (pass, fail, error); the unbiased
pass@k; the score key follows the scorers (and a verifier's code), the adapter and merged keys do not."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.core.config import ConfigError, experiment_from_dict
from trainer.training.scorers import (ERROR, FAIL, PASS, ScorerError, as_outcome, build_scorers, experiment_scorers,
                                      judge_all, pass_at_k, score_answers, scorer_specs)

SORTED = r"(\d+(?:\s+\d+)*)\s*$"  # the trailing run of numbers

CHECKS = '''
import re


def sorted_numbers(sample, text):
    """The numbers at the end of the answer are the reference's, in order."""
    return re.findall(r"\\d+", text) == str(sample["reference"]).split()


def as_number(sample, text):
    return 1 if text.strip() == sample["reference"] else 0


def not_a_verdict(sample, text):
    return "yes"


def picky(sample, text):
    if "boom" in text:
        raise RuntimeError("cannot parse")
    return text.strip() == sample["reference"]


def divides(sample, text):
    return 1 / 0


def sees(sample, text):
    return {"prompt", "reference", "text"} <= set(sample) and sample["text"] == text


def answers_the_question(sample, text):
    return text == "answer to " + sample["prompt"]
'''


@pytest.fixture
def checks(tmp_path) -> Path:
    (tmp_path / "checks.py").write_text(CHECKS)
    return tmp_path


def outcomes(spec, pairs, base_dir: Path | str = ".") -> list[str]:
    (scorer,) = build_scorers([spec], base_dir)
    samples = [{"prompt": "p", "reference": ref, "text": text, "row": i} for i, (text, ref) in enumerate(pairs)]
    return [o for o, _ in judge_all(scorer, samples)]


def test_exact_strips_and_compares():
    pairs = [("12", "12"), (" 12\n", "12"), ("12", " 12 "), ("12.0", "12"), ("Sorted ascending: 64 74 86", "64 74 86"),
             ("ABC", "abc"), ("", ""), ("a  b", "a b")]
    assert outcomes("exact", pairs) == [PASS, PASS, PASS, FAIL, FAIL, FAIL, PASS, FAIL]


def test_answer_regex_compares_the_first_group_or_the_whole_reference():
    spec = {"answer_regex": {"pattern": SORTED}}
    pairs = [("Sorted ascending: 64 74 86", "64 74 86"),  # the case exact match counts wrong
             ("Sorted ascending: 64 74 86\n", "64 74 86"),
             ("64 74 86", "64 74 86"),
             ("Sorted ascending: 64 86 74", "64 74 86"),
             ("Sorted ascending: 64  74 86", "64 74 86"),  # whitespace collapsed, as the loop's filter compares
             ("no numbers here", "64 74 86"),
             ("Sorted: 1 2 3 then 64 74 86", "64 74 86"),  # the trailing run is the answer
             ("64 74 86 done", "64 74 86")]
    assert outcomes(spec, pairs) == [PASS, PASS, PASS, FAIL, PASS, FAIL, PASS, FAIL]
    # The reference without a match of the pattern is compared whole.
    gsm = {"answer_regex": {"pattern": r"#### (-?\d+)"}}
    assert outcomes(gsm, [("so 6 * 7 = 42 #### 42", "42"), ("#### 41", "42"), ("42", "42"),
                          ("#### 42", "steps #### 42"), ("#### -3", "-3")]) == [PASS, FAIL, FAIL, PASS, PASS]
    # No group: the whole match; case folded.
    assert outcomes({"answer_regex": {"pattern": r"[A-Z]+"}}, [("answer: ABC", "ABC"), ("answer: abc", "xyz")]) == [
        PASS, FAIL]


def test_verifier_resolved_as_the_loop_resolves_it(checks):
    pairs = [("Sorted ascending: 64 74 86", "64 74 86"), ("64 74 86", "64 74 86"), ("Sorted: 64 86 74", "64 74 86"),
             ("nothing", "64 74 86")]
    assert outcomes({"verifier": "checks:sorted_numbers"}, pairs, checks) == [PASS, PASS, FAIL, FAIL]
    assert outcomes({"verifier": "checks:as_number"}, [("7", "7"), ("8", "7")], checks) == [PASS, FAIL]
    assert outcomes({"verifier": "checks:sees"}, [("x", "y")], checks) == [PASS]
    # An importable module's function (the same `module:function` form).
    assert outcomes({"verifier": "operator:ne"}, [("a", "b")]) == [PASS]  # a dict is never equal to a str


def test_outcomes_of_return_values():
    assert [as_outcome(v)[0] for v in (True, False, 1, 0, 1.0, 0.0)] == [PASS, FAIL, PASS, FAIL, PASS, FAIL]
    assert [as_outcome(v)[0] for v in (2, -1, 0.5, float("nan"), None, "yes", [True])] == [ERROR] * 7


def test_errors_are_counted_apart_from_fails_and_never_pass(checks):
    (picky,) = build_scorers([{"verifier": "checks:picky"}], checks)
    rows = [{"prompt": f"q{i}", "reference": ref, "row_id": i} for i, ref in enumerate(["a", "b", "c", "d"])]
    report, answers = score_answers([picky], rows, ["a", "boom", "x", "boom b"])
    assert report["verifier"]["passed"] == 1 and report["verifier"]["failed"] == 1
    assert report["verifier"]["errors"] == 2 and report["verifier"]["pass_rate"] == pytest.approx(0.25)
    assert report["verifier"]["first_error"] == "row 1: RuntimeError: cannot parse"
    assert [a["outcomes"]["verifier"] for a in answers] == [PASS, ERROR, FAIL, ERROR]
    assert answers[1]["errors"] == {"verifier": "RuntimeError: cannot parse"} and "errors" not in answers[0]
    assert answers[3] == {"row": 3, "prompt_id": 3, "reference": "d", "answer": "boom b",
                          "outcomes": {"verifier": ERROR}, "errors": {"verifier": "RuntimeError: cannot parse"}}
    # Several scorers judge the same answers, each counted on its own.
    exact, regex = build_scorers(["exact", {"answer_regex": {"pattern": "(b)"}}])
    report, answers = score_answers([exact, regex, picky], rows[:2], ["a", "boom"])
    assert {k: (v["passed"], v["failed"], v["errors"]) for k, v in report.items()} == {
        "exact": (1, 1, 0), "answer_regex": (1, 1, 0), "verifier": (1, 0, 1)}
    assert answers[1]["outcomes"] == {"exact": FAIL, "answer_regex": PASS, "verifier": ERROR}


def test_a_scorer_that_errs_on_every_row_or_does_not_import_is_one_line(checks):
    rows = [{"prompt": "q", "reference": "1", "row_id": 7}] * 3
    (divides,) = build_scorers(["exact", {"verifier": "checks:divides"}], checks)[1:]
    with pytest.raises(ScorerError, match=r"^eval\.scorers\[1\]\.verifier 'checks:divides': row 0: "
                                          r"ZeroDivisionError: division by zero$"):
        score_answers([divides], rows, ["1", "2", "3"])
    (odd,) = build_scorers([{"verifier": "checks:not_a_verdict"}], checks)
    with pytest.raises(ScorerError, match=r"^eval\.scorers\[0\]\.verifier 'checks:not_a_verdict': row 0: "
                                          r"returned 'yes', expected a bool \(or 0/1\)$"):
        score_answers([odd], rows, ["1", "2", "3"])
    for dotted, why in [("nowhere:f", "ModuleNotFoundError"), ("checks:missing", "AttributeError")]:
        with pytest.raises(ScorerError) as e:
            build_scorers([{"verifier": dotted}], checks)
        assert str(e.value).startswith(f"eval.scorers[0].verifier '{dotted}': cannot import: {why}: ")
        assert "\n" not in str(e.value)
    (checks / "broken.py").write_text("1/0\n")
    with pytest.raises(ScorerError, match=r"^eval\.scorers\[0\]\.verifier 'broken:f': cannot import: "
                                          r"ZeroDivisionError: division by zero$"):
        build_scorers([{"verifier": "broken:f"}], checks)
    # No rows: nothing to judge, no error.
    assert score_answers([divides], [], [])[0]["verifier"]["passed"] == 0


def test_bad_scorer_entries_name_the_entry():
    for specs, message in [
        (["close"], r"^eval\.scorers\[0\]: unknown scorer 'close'; known"),
        (["exact", "verifier"], r"^eval\.scorers\[1\]: unknown scorer 'verifier' \(it needs options"),
        ([{"answer_regex": {"pattern": "("}}], r"^eval\.scorers\[0\]\.answer_regex\.pattern: bad regular expression"),
        ([{"answer_regex": "(x)"}], r"^eval\.scorers\[0\]\.answer_regex: expected \{pattern: REGEX\}"),
        ([{"verifier": 3}], r"^eval\.scorers\[0\]\.verifier: expected 'package\.module:function'"),
        ([{"exact": 1}], r"^eval\.scorers\[0\]\.exact: takes no options"),
        ([], r"^eval\.scorers: expected a non-empty list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_scorers(specs)


def test_yaml_section_and_defaults(tmp_path, checks):
    base = {"name": "e", "store": str(tmp_path / "store")}
    plain = experiment_from_dict(base, base_dir=tmp_path)
    assert plain.eval.scorers is None and scorer_specs(plain) == (["exact"], "eval.scorers")
    assert [s.id for s in experiment_scorers(plain)] == ["exact"]
    given = experiment_from_dict({**base, "eval": {"scorers": ["exact", {"answer_regex": {"pattern": SORTED}}]},
                                  "data": {"eval": {"fraction": 0.1}}}, base_dir=tmp_path)  # data.eval is the split
    assert [s.id for s in experiment_scorers(given)] == ["exact", "answer_regex"]
    assert given.data.eval.fraction == 0.1
    # A loop's verifier scores its held-out set unless `eval.scorers` says otherwise.
    loop = {"prompts": {"source": {"path": "p.jsonl"}},
            "filters": ["dedup", {"length": {"max_tokens": 9}}, {"verifier": "checks:sorted_numbers"}]}
    looped = experiment_from_dict({**base, "loop": loop}, base_dir=checks)
    assert scorer_specs(looped) == ([{"verifier": "checks:sorted_numbers"}], "loop.filters[2]")
    (default,) = experiment_scorers(looped)
    assert default.label == "loop.filters[2].verifier 'checks:sorted_numbers'"
    with pytest.raises(ConfigError, match=r"^loop\.filters\[0\]\.verifier: expected 'package\.module:function'"):
        scorer_specs(experiment_from_dict({**base, "loop": {**loop, "filters": [{"verifier": 3}]}}, base_dir=checks))
    both = experiment_from_dict({**base, "loop": loop, "eval": {"scorers": [{"verifier": "checks:sorted_numbers"}]}},
                                base_dir=checks)
    (v,) = experiment_scorers(both)
    assert v.label == "eval.scorers[0].verifier 'checks:sorted_numbers'"
    with pytest.raises(ConfigError, match=r"eval: unknown key\(s\) \['scorer'\]"):
        experiment_from_dict({**base, "eval": {"scorer": ["exact"]}}, base_dir=tmp_path)


# -- pass@k ---------------------------------------------------------------------------------------

def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of the k-subsets of n samples (c passing) that hold a passing sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_unbiased_pass_at_k_equals_the_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0


def test_pass_at_k_special_values_and_stability():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1: the fraction passing
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert 0.0 < pass_at_k(1000, 1, 1) < pass_at_k(1000, 1, 500) < 1.0  # no overflow, no huge binomials
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def _loop_outputs(tmp_path: Path, references: list[str], rows: list[tuple[str, int, str]]):
    import pyarrow as pa

    from trainer.core.arrow_io import write_table
    from trainer.core.store import StageOutput
    from trainer.training.generate import SAMPLES_SCHEMA

    held = tmp_path / "held"
    held.mkdir()
    (held / "held_out.jsonl").write_text("".join(json.dumps({"row_id": i, "prompt": f"q{i}", "reference": ref}) + "\n"
                                                 for i, ref in enumerate(references)))
    samples = tmp_path / "samples"
    samples.mkdir()
    write_table(samples / "samples-00000.arrow", pa.Table.from_pylist(
        [{"prompt_id": p, "sample_index": i, "text": text, "token_count": 1, "stop_reason": "end_of_turn",
          "round": 0, "generator_version": "g", "seed": 0} for p, i, text in rows], schema=SAMPLES_SCHEMA))
    return StageOutput("samples", "s", samples, {}, True), StageOutput("templated", "t", held, {}, True)


def test_loop_pass_at_k_is_unbiased_and_takes_the_scorer(tmp_path, checks):
    from trainer.loop.rounds import pass_at_k as loop_pass_at_k

    refs = ["64 74 86", "1 2", "5"]
    rows = [("0", 0, "Sorted ascending: 64 74 86"), ("0", 1, "64 74 86"), ("0", 2, "86 74 64"), ("0", 3, "x"),
            ("1", 0, "1 2"), ("1", 1, "2 1"), ("1", 2, "no"), ("1", 3, "no"),
            ("2", 0, "4"), ("2", 1, "6"), ("2", 2, "7"), ("2", 3, "8")]
    samples, held = _loop_outputs(tmp_path, refs, rows)
    # exact: prompt 0 has 1 of 4, prompt 1 has 1 of 4, prompt 2 none
    assert loop_pass_at_k(samples, held) == pytest.approx(2 / 3)  # k = n: any of the n samples
    assert loop_pass_at_k(samples, held, k=1) == pytest.approx((1 / 4 + 1 / 4 + 0) / 3)
    assert loop_pass_at_k(samples, held, k=2) == pytest.approx((0.5 + 0.5 + 0) / 3)
    # the verifier: prompt 0 has 2 of 4 (the `Sorted ascending:` answer passes)
    scorers = build_scorers([{"verifier": "checks:sorted_numbers"}], checks)
    assert loop_pass_at_k(samples, held, scorers, k=1) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert loop_pass_at_k(samples, held, scorers, k=2) == pytest.approx(
        (brute_force_pass_at_k(4, 2, 2) + brute_force_pass_at_k(4, 1, 2)) / 3)
    # the experiment's scorers
    exp = experiment_from_dict({"name": "e", "store": str(tmp_path / "store"),
                                "eval": {"scorers": [{"verifier": "checks:sorted_numbers"}]}}, base_dir=checks)
    assert loop_pass_at_k(samples, held, k=1, exp=exp) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    # a verifier that errs on every sample fails in one line
    with pytest.raises(ScorerError, match=r"^eval\.scorers\[0\]\.verifier 'checks:divides': row 0: ZeroDivisionError"):
        loop_pass_at_k(samples, held, build_scorers([{"verifier": "checks:divides"}], checks))


def test_loop_pass_at_k_hands_the_verifier_what_was_asked(tmp_path, checks):
    from trainer.core.store import StageOutput
    from trainer.loop.rounds import pass_at_k as loop_pass_at_k

    samples, held = _loop_outputs(tmp_path, ["r0", "r1"], [("0", 0, "answer to q0"), ("0", 1, "answer to <s>q0"),
                                                            ("1", 0, "answer to <s>q1"), ("1", 1, "answer to q1")])
    written = [json.loads(line) for line in (held.path / "held_out.jsonl").read_text().splitlines()]
    asking = tmp_path / "asking"
    asking.mkdir()
    (asking / "held_out.jsonl").write_text("".join(
        json.dumps({**row, "prompt": f"<s>{row['prompt']}", "asked": row["prompt"]}) + "\n" for row in written))
    asked = StageOutput("templated", "t2", asking, {}, True)
    scorers = build_scorers([{"verifier": "checks:answers_the_question"}], checks)
    assert loop_pass_at_k(samples, asked, scorers, k=1) == pytest.approx(0.5)
    assert loop_pass_at_k(samples, asked, scorers) == pytest.approx(1.0)
    # the experiment's default: its loop's verifier
    loop = {"prompts": {"source": {"path": "p.jsonl"}}, "filters": [{"verifier": "checks:answers_the_question"}]}
    exp = experiment_from_dict({"name": "e", "store": str(tmp_path / "store"), "loop": loop}, base_dir=checks)
    assert loop_pass_at_k(samples, asked, k=1, exp=exp) == pytest.approx(0.5)
    # a file without `asked`: the rendered prompt (here q0, q1) is what the verifier gets
    only_rendered = [("0", 0, "answer to q0"), ("0", 1, "answer to <s>q0"), ("1", 0, "no"), ("1", 1, "no")]
    (tmp_path / "old").mkdir()
    samples, held = _loop_outputs(tmp_path / "old", ["r0", "r1"], only_rendered)
    assert loop_pass_at_k(samples, held, scorers, k=1) == pytest.approx(0.25)


# -- keys -----------------------------------------------------------------------------------------

def _summary(tmp_path: Path) -> dict:
    from trainer.training.spec import TrainingSummary

    return TrainingSummary(experiment="e", mode="lora", output_dir=str(tmp_path / "adapter"), base_model="b",
                           base_model_path=str(tmp_path / "base"), global_step=1, steps_per_epoch=1, train_rows=1,
                           world_size=1, train_loss=0.0, trainable_tokens=1, tokens=1, train_runtime=0.0,
                           vocab_size=8, base_vocab_rows=8, new_token_ids=[], eot_token="<|im_end|>",
                           tags={}).to_dict()


def test_score_key_follows_the_scorers_and_their_code_not_the_adapter_or_merged_key(tmp_path, checks):
    from trainer.core.store import StageOutput, Store
    from trainer.training.launch import adapter_key, plan_merge, plan_score

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"prompt": "q", "reference": "1 2"}) + "\n")
    adapter = StageOutput("adapter", "adapter-1", tmp_path / "adapter", _summary(tmp_path), True)

    def plan(scorers=None):
        exp = experiment_from_dict({"name": "e", "store": str(tmp_path / "store"), "tokenizer": {"path": "builtin:tiny"},
                                    **({"eval": {"scorers": scorers}} if scorers is not None else {})}, base_dir=checks)
        merge = plan_merge(exp, adapter, tmp_path / "tok")
        merged = StageOutput("merged", merge.key, merge.output_dir, {}, True)
        step = plan_score(exp, merged, adapter, tmp_path / "tok", held_out, score_base=False)
        step.merged_key = merge.key
        key, _ = adapter_key(exp, Store(exp.store_root), "packed-train", None, "tok-identity", 40)
        return key, step

    adapter0, plain = plan()
    assert plain.spec.scorers == ["exact"] and plain.spec.scorers_where == "eval.scorers"
    adapter1, exact = plan(["exact"])
    assert exact.score_key == plain.score_key  # `[exact]` written out is the default
    verifier = [{"verifier": "checks:sorted_numbers"}]
    adapter2, verified = plan(verifier)
    assert verified.spec.scorers == verifier and verified.spec.scorers_base_dir == str(checks)
    (checks / "checks.py").write_text(CHECKS.replace('.split()', '.strip().split()'))  # the verifier's code edited
    adapter3, edited = plan(verifier)
    adapter4, same_code = plan(verifier)
    assert same_code.score_key == edited.score_key  # planned again, the same code: the same key
    _, regex = plan([{"answer_regex": {"pattern": SORTED}}])
    score_keys = [plain.score_key, verified.score_key, edited.score_key, regex.score_key]
    assert len(set(score_keys)) == len(score_keys)  # every change of scorer rescores …
    steps = [plain, exact, verified, edited, same_code, regex]
    assert {s.merged_key for s in steps} == {plain.merged_key}  # … the same merged model (merged key)
    assert {adapter0, adapter1, adapter2, adapter3, adapter4} == {adapter0}  # never retrains
    # a verifier that does not import fails the planning, in one line
    with pytest.raises(ScorerError, match=r"^eval\.scorers\[0\]\.verifier 'checks:gone': cannot import"):
        plan([{"verifier": "checks:gone"}])


# -- end to end: `python -m trainer.training.score` ------------------------------------------------

def test_score_process_scores_with_every_scorer_and_keeps_the_answers(tmp_path, checks):
    """A tiny model scored on real generations: the score reports every scorer, `accuracy` is the
    first one's, and answers.jsonl keeps the answers."""
    from tests.train_helpers import base_vocab, held_out_rows, make_tokenizer, train_env, write_held_out
    from trainer.core.config import ModelConfig
    from trainer.core.process_step import write_spec_file
    from trainer.core.schemas import SCORE
    from trainer.core.store import Store
    from trainer.training.base_model import resolve_base_model
    from trainer.training.score import ANSWERS
    from trainer.training.spec import ScoreSpec

    model = resolve_base_model(ModelConfig(), tmp_path / "models", base_vocab())
    tok = make_tokenizer(tmp_path / "tok")
    held_out = write_held_out(tmp_path / "held_out.jsonl", held_out_rows(4))
    (checks / "always.py").write_text("def yes(sample, text):\n    return True\n\n\n"
                                      "def odd_rows(sample, text):\n"
                                      "    if sample['prompt'].endswith('<|im_start|>') and sample['row'] % 2:\n"
                                      "        raise ValueError('odd row')\n    return False\n")
    scorers = ["exact", {"verifier": "always:yes"}, {"verifier": "always:odd_rows"}]
    store = tmp_path / "store"
    spec = ScoreSpec(store=str(store), tokenizer_dir=tok, models={"merged": {"model_dir": str(model), "score_key": "s1"}},
                     accuracy_rows=3, max_new_tokens=3, eot_token="<|im_end|>", held_out=held_out, scorers=scorers,
                     scorers_base_dir=str(checks))
    spec_file = write_spec_file(tmp_path / "spec.json", spec)
    done = subprocess.run([sys.executable, "-m", "trainer.training.score", str(spec_file)], env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = Store(str(store)).path("score", "s1")
    score = json.loads((out / SCORE).read_text())
    assert score["scored_rows"] == 3 and score["score_version"] == "s1"
    assert list(score["scorers"]) == ["exact", "verifier", "verifier_2"]
    assert score["accuracy"] == score["scorers"]["exact"]["pass_rate"] and score["headline"] == "exact"
    assert (score["scorers"]["verifier"]["passed"], score["scorers"]["verifier"]["pass_rate"]) == (3, 1.0)
    odd = score["scorers"]["verifier_2"]
    assert (odd["passed"], odd["failed"], odd["errors"]) == (0, 2, 1)
    assert odd["first_error"] == "row 1: ValueError: odd row"
    answers = [json.loads(line) for line in (out / ANSWERS).read_text().splitlines()]
    rows = held_out_rows(4)
    assert [(a["row"], a["prompt_id"], a["reference"]) for a in answers] == [(i, i, rows[i]["reference"])
                                                                            for i in range(3)]
    assert all(isinstance(a["answer"], str) for a in answers)
    assert [a["outcomes"]["verifier_2"] for a in answers] == [FAIL, ERROR, FAIL]
    assert [a["outcomes"]["exact"] == PASS for a in answers] == [
        a["answer"].strip() == a["reference"] for a in answers]

    # A verifier that errs on every row fails the process in one line, before any score is written.
    failing = dataclasses.replace(spec, models={"merged": {"model_dir": str(model), "score_key": "s2"}},
                                  scorers=[{"verifier": "checks:divides"}])
    done = subprocess.run([sys.executable, "-m", "trainer.training.score",
                           str(write_spec_file(tmp_path / "failing.json", failing))],
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "eval.scorers[0].verifier 'checks:divides': row 0: ZeroDivisionError: division by zero" in done.stderr
    assert not Store(str(store)).has("score", "s2")
