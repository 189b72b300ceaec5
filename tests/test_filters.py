"""The loop's sample filters: what each keeps and rejects (with why), their order, round metrics."""

from __future__ import annotations

import pytest

from trainer.core.config import ConfigError
from trainer.data import default_data
from trainer.loop.filters import build_pipeline

GSM = "#### (-?\\d+)"


def sample(pid, text, tokens=5, stop="eos", reference="42", prompt="What is 20 + 22?\nAnswer:"):
    return {"prompt_id": pid, "prompt": prompt, "text": text, "token_count": tokens,
            "stop_reason": stop, "reference": reference}


def run(specs, samples, tmp_path, drop_truncated=True):
    """Filter `samples`; every input comes back exactly once, accepted or rejected with a reason."""
    for i, s in enumerate(samples):
        s["n"] = i
    result = build_pipeline(specs, drop_truncated=drop_truncated, base_dir=tmp_path).run(samples)
    back = sorted([s["n"] for s in result.accepted] + [r.sample["n"] for r in result.rejected])
    assert back == list(range(len(samples)))
    assert all(r.reason for r in result.rejected)
    return result


def texts(records):
    return [r["text"] for r in records]


def test_truncated_samples_dropped_by_default(tmp_path):
    samples = [sample(0, "#### 42"), sample(0, "#### 4", stop="length", tokens=64)]
    result = run([], samples, tmp_path)
    assert texts(result.accepted) == ["#### 42"]
    (rej,) = result.rejected
    assert (rej.filter, rej.reason) == ("truncated", "stopped at max_new_tokens (64 tokens)")
    assert texts(run([], samples, tmp_path, drop_truncated=False).accepted) == ["#### 42", "#### 4"]


def test_answer_regex(tmp_path):
    samples = [
        sample(0, "20 + 22 = 42\n#### 42"),
        sample(0, "#### 41"),
        sample(0, "I think it is 42"),                       # no "#### n": nothing to compare
        sample(1, "#### 7", reference="Half of 14.\n#### 7"),  # the reference's own group
        sample(2, "#### 7", reference=None),
    ]
    result = run([{"answer_regex": {"pattern": GSM}}], samples, tmp_path)
    assert [s["n"] for s in result.accepted] == [0, 3]
    assert [(r.sample["n"], r.filter, r.reason) for r in result.rejected] == [
        (1, "answer_regex", "answer '41' != reference '42'"),
        (2, "answer_regex", f"no answer matching {GSM!r}"),
        (4, "answer_regex", "prompt has no reference to check the answer against"),
    ]


def test_answer_regex_compares_normalised_text(tmp_path):
    samples = [sample(0, "Answer:  New   York", reference="new york"),
               sample(0, "Answer: Boston", reference="new york")]
    result = run([{"answer_regex": {"pattern": "Answer: (.+)"}}], samples, tmp_path)
    assert texts(result.accepted) == ["Answer:  New   York"]


def _prompt_of(record: dict):
    """The prompt the loop asks for a default-data record: its prompt, or its conversation
    without the final answer."""
    return record["prompt"] if "prompt" in record else record["messages"][:-1]


def test_verifier_default_task(tmp_path):
    records = default_data.generate("train", 40, seed=5)
    assert {r["task"] for r in records} == set(default_data.TASKS)
    assert {"prompt" in r for r in records} == {True, False}  # both prompt shapes
    samples = []
    for i, r in enumerate(records):
        samples.append(sample(i, f" {r['answer']}\n", prompt=_prompt_of(r), reference=None))
        samples.append(sample(i, r["answer"] + "0", prompt=_prompt_of(r), reference=None))
    result = run([{"verifier": "trainer.data.default_data:verify"}], samples, tmp_path)
    assert [s["n"] for s in result.accepted] == list(range(0, 80, 2))
    assert {(r.filter, r.reason) for r in result.rejected} == {
        ("verifier", "trainer.data.default_data:verify returned False")}


def test_verifier_in_a_file_beside_the_yaml(tmp_path):
    (tmp_path / "checks.py").write_text(
        "def short(record, text):\n    return len(text) <= 3\n"
        "def maybe(record, text):\n    return 1\n")
    result = run([{"verifier": "checks:short"}], [sample(0, "abc"), sample(0, "abcd")], tmp_path)
    assert texts(result.accepted) == ["abc"]
    with pytest.raises(ValueError, match=r"checks:maybe: returned 1 for prompt_id 7, expected bool"):
        build_pipeline([{"verifier": "checks:maybe"}], drop_truncated=True, base_dir=tmp_path).run(
            [sample(7, "x")])


def test_length_bounds(tmp_path):
    samples = [sample(0, "a", tokens=1), sample(0, "b", tokens=5), sample(0, "c", tokens=9)]
    result = run([{"length": {"min_tokens": 2, "max_tokens": 8}}], samples, tmp_path)
    assert texts(result.accepted) == ["b"]
    assert [r.reason for r in result.rejected] == ["1 tokens < min_tokens 2", "9 tokens > max_tokens 8"]
    assert texts(run([{"length": {"max_tokens": 5}}], samples, tmp_path).accepted) == ["a", "b"]


def test_dedup_is_per_prompt_on_normalised_text(tmp_path):
    samples = [sample(0, "#### 42"), sample(0, "####   42 "), sample(0, "#### 42."),
               sample(1, "#### 42")]
    result = run(["dedup"], samples, tmp_path)
    assert [s["n"] for s in result.accepted] == [0, 2, 3]
    (rej,) = result.rejected
    assert (rej.sample["n"], rej.filter) == (1, "dedup")


def test_max_per_prompt_keeps_the_first_k(tmp_path):
    samples = [sample(p, t) for p, t in [(0, "a"), (1, "b"), (0, "c"), (0, "d"), (1, "e")]]
    result = run([{"max_per_prompt": 2}], samples, tmp_path)
    assert texts(result.accepted) == ["a", "b", "c", "e"]
    assert [(r.sample["text"], r.reason) for r in result.rejected] == [("d", "prompt already has 2 kept samples")]


def test_best_k_by_score(tmp_path):
    (tmp_path / "scores.py").write_text("def length(record, text):\n    return len(text)\n")
    samples = [sample(0, "aa"), sample(0, "aaaa"), sample(0, "bbbb"), sample(0, "a"), sample(1, "z")]
    result = run([{"best_k": {"k": 2, "scorer": "scores:length"}}], samples, tmp_path)
    # Highest first; of equal scores the earlier sample wins.
    assert texts(result.accepted) == ["aaaa", "bbbb", "z"]
    assert [s["score"] for s in result.accepted] == [4.0, 4.0, 1.0]
    assert [r.reason for r in result.rejected] == ["score 2 not among the best 2 of this prompt",
                                                   "score 1 not among the best 2 of this prompt"]
    m = result.metrics()
    assert m["mean_score_all"] == pytest.approx(12 / 5)
    assert m["mean_score_kept"] == pytest.approx(3.0)


def test_filters_run_in_the_order_written(tmp_path):
    def samples():
        return [sample(0, "x"), sample(0, "x"), sample(0, "y")]

    first_dedup = run(["dedup", {"max_per_prompt": 2}], samples(), tmp_path)
    first_cap = run([{"max_per_prompt": 2}, "dedup"], samples(), tmp_path)
    assert texts(first_dedup.accepted) == ["x", "y"]
    assert texts(first_cap.accepted) == ["x"]
    assert [r.filter for r in first_cap.rejected] == ["max_per_prompt", "dedup"]
    # A sample rejected by an earlier filter never reaches a later one.
    result = run([{"answer_regex": {"pattern": GSM}}, {"length": {"max_tokens": 3}}],
                 [sample(0, "#### 41", tokens=9)], tmp_path)
    assert [r.filter for r in result.rejected] == ["answer_regex"]


def test_metrics_of_a_hand_made_round(tmp_path):
    samples = [
        sample(0, "#### 42", tokens=4),
        sample(0, "#### 42", tokens=4),                 # duplicate of the first
        sample(0, "#### 40", tokens=4),
        sample(1, "#### 9", tokens=6, reference="9"),
        sample(1, "long", tokens=10, stop="length", reference="9"),
        sample(2, "#### 1", tokens=2, reference="2"),
    ]
    result = run([{"answer_regex": {"pattern": GSM}}, "dedup"], samples, tmp_path)
    assert result.metrics() == {
        "prompts": 3,
        "samples": 6,
        "accepted": 2,
        "acceptance_rate": pytest.approx(2 / 6),
        "coverage": pytest.approx(2 / 3),
        "accepted_per_prompt": pytest.approx(2 / 3),
        "duplicate_rate": pytest.approx(1 / 6),
        "truncation_rate": pytest.approx(1 / 6),
        "mean_sample_tokens": pytest.approx(30 / 6),
        "rejected_by": {"truncated": 1, "answer_regex": 2, "dedup": 1},
    }


def test_a_sample_without_a_required_key_is_named(tmp_path):
    bad = sample(3, "x")
    del bad["token_count"]
    with pytest.raises(ValueError, match=r"sample 0 \(prompt_id 3\): missing key\(s\) \['token_count'\]"):
        build_pipeline([], drop_truncated=True, base_dir=tmp_path).run([bad])


def _wrong_arity(record):
    return True


@pytest.mark.parametrize("specs, message", [
    (["dedup", "sort"], r"^loop\.filters\[1\]: unknown filter 'sort'; known: \['answer_regex', 'band', 'best_k', "),
    ([{"answer_regex": {"pattern": "#### (\\d+"}}], r"^loop\.filters\[0\]\.answer_regex\.pattern: bad regular expression"),
    ([{"answer_regex": {"patern": GSM}}], r"^loop\.filters\[0\]\.answer_regex: unknown key\(s\) \['patern'\]"),
    (["dedup", {"length": {"max_tokens": 9}}, {"verifier": "no_such_module.sub:check"}],
     r"^loop\.filters\[2\]\.verifier: cannot import 'no_such_module\.sub:check'"),
    ([{"verifier": "trainer.data.default_data:no_such"}], r"^loop\.filters\[0\]\.verifier: 'trainer.data.default_data:no_such' not found"),
    ([{"verifier": f"{__name__}:_wrong_arity"}],
     r"^loop\.filters\[0\]\.verifier: '.*_wrong_arity' must be \(sample, text\) -> bool; its signature is \(record\)"),
    ([{"verifier": "trainer.data.default_data:DEFAULT_TEST_ROWS"}], r"^loop\.filters\[0\]\.verifier: .* is not callable"),
    ([{"best_k": {"k": 1}}], r"^loop\.filters\[0\]\.best_k: missing \['scorer'\]"),
    ([{"best_k": {"k": 1, "scorer": "trainer.data.default_data:verify"}},
      {"best_k": {"k": 2, "scorer": "trainer.data.default_data:verify"}}], r"^loop\.filters\[1\]\.best_k: only one best_k"),
    ([{"max_per_prompt": 0}], r"^loop\.filters\[0\]\.max_per_prompt: expected an integer >= 1, got 0"),
    ([{"length": {"min_tokens": 9, "max_tokens": 3}}], r"^loop\.filters\[0\]\.length: min_tokens 9 > max_tokens 3"),
    ([{"dedup": True}], r"^loop\.filters\[0\]\.dedup: takes no options"),
    (["verifier"], r"^loop\.filters\[0\]: filter 'verifier' needs options"),
    ([{"dedup": None, "length": {}}], r"^loop\.filters\[0\]: expected a filter name or a one-key mapping"),
])
def test_bad_filter_entries_name_their_key(specs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build_pipeline(specs, drop_truncated=True, base_dir=tmp_path)


def test_a_verifier_file_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError, match=r"^loop\.filters\[0\]\.verifier: importing 'broken:check' failed: "
                                          r"RuntimeError: no GPU here"):
        build_pipeline([{"verifier": "broken:check"}], drop_truncated=True, base_dir=tmp_path)
