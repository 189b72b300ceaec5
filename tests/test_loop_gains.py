"""The loop keeps its gains: rows of the SFT data replayed into each round, the band filter
(prompts every sample solved teach nothing), and preference pairs from the same samples."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pytest

from trainer.core.arrow_io import write_table
from trainer.core.config import ConfigError
from trainer.core.keys import accepted_params
from trainer.core.store import StageOutput, Store
from trainer.data.prepare import DataPipeline
from trainer.data.stages import read_rows
from trainer.loop import rounds
from trainer.loop.filters import CORRECTNESS_FILTERS, build_pipeline
from trainer.loop.settings import loop_config, parse_loop
from trainer.training.generate import SAMPLES_SCHEMA

from .conftest import small_rows

LOOP = {"prompts": {"source": {"builtin": "default", "rows": 12}},
        "generation": {"samples_per_prompt": 4, "temperature": 1.0, "max_new_tokens": 6, "seed": 3},
        "filters": ["dedup"], "drop_truncated": False, "stop": {"max_rounds": 3}}


def build_loop(make_experiment, name="gains", rows=None, **loop):
    exp = make_experiment(name=name, rows=rows if rows is not None else small_rows(40), loop={**LOOP, **loop})
    pipeline = DataPipeline(exp, progress=False)
    tokenizer = pipeline.tokenizer_output()
    cfg = loop_config(exp)
    prompts = rounds.build_prompts(exp, cfg, tokenizer)
    return SimpleNamespace(exp=exp, cfg=cfg, tokenizer=tokenizer, prompts=prompts, sft_raw=pipeline.raw("train"),
                           prompt_rows=rounds._prompt_rows(exp, prompts), made=[0])


def write_samples(loop, answers: list[tuple[str, str]], round_index: int = 0) -> StageOutput:
    """A samples output of (prompt id, text) in generation order, each prompt's samples numbered."""
    loop.made[0] += 1
    path = loop.exp.resolve_path(f"samples-{loop.made[0]}")
    path.mkdir()
    counts: dict[str, int] = {}
    rows = []
    for pid, text in answers:
        rows.append({"prompt_id": pid, "sample_index": counts.get(pid, 0), "text": text, "token_count": 2,
                     "stop_reason": "eot", "round": round_index, "generator_version": "g", "seed": 0})
        counts[pid] = counts.get(pid, 0) + 1
    write_table(path / "samples-00000.arrow", pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
    return StageOutput("samples", f"samples-{loop.made[0]}", path, {}, cache_hit=False)


def distinct_answers(loop, n: int) -> list[tuple[str, str]]:
    ids = list(loop.prompt_rows)
    return [(ids[i % len(ids)], f" answer {i}") for i in range(n)]


def replaying(cfg, fraction: float, data: str = "round"):
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, replay=fraction, data=data))


def jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_sft_row(record: dict) -> dict:
    """What a default-data SFT record trains on, in the round's field names (its extra keys left out)."""
    if "messages" in record:
        return {"messages": record["messages"]}
    return {"prompt": record["prompt"], "completion": record["completion"]}


# -- replay --------------------------------------------------------------------------------------

def test_replayed_sft_rows_make_up_the_fraction(make_experiment):
    loop = build_loop(make_experiment)
    sft = read_rows(loop.sft_raw)
    records = dict(zip(sft.column("row_id").to_pylist(), map(json.loads, sft.column("record").to_pylist())))
    available = len(records)
    largest = None
    for fraction in (0.1, 0.25, 0.5, 0.75):
        for accepted in (1, 3, 8, 20):
            out = rounds.build_accepted(loop.exp, replaying(loop.cfg, fraction), 0,
                                        write_samples(loop, distinct_answers(loop, accepted)), loop.prompts, None,
                                        replay=loop.sft_raw)
            n = min(round(fraction * accepted / (1 - fraction)), available)
            train = jsonl(out.path / rounds.ACCEPTED_ROWS)
            replayed = jsonl(out.path / rounds.REPLAYED_ROWS)
            assert out.manifest["replayed_rows"] == len(replayed) == n, (fraction, accepted)
            assert len(train) == out.manifest["training_rows"] == accepted + n
            assert out.manifest["metrics"]["accepted"] == accepted and out.manifest["replay_rejected"] == 0
            if n < available:  # the fraction holds up to rounding to whole rows
                assert abs(n / len(train) - fraction) <= 0.5 * (1 - fraction) / len(train) + 1e-12
            # Drawn without replacement, each the SFT record converted; placed after the accepted rows.
            assert len({r["row_id"] for r in replayed}) == n
            assert [r["line"] for r in replayed] == list(range(accepted, accepted + n))
            for r in replayed:
                assert train[r["line"]] == as_sft_row(records[r["row_id"]])
            # The accepted rows stay clean training rows: no replay marks in them.
            assert all(set(row) in ({"messages"}, {"prompt", "completion"}) for row in train)
            if fraction == 0.5 and accepted == 20:
                largest = out
    assert jsonl(largest.path / rounds.ACCEPTED_ROWS)[:20] != jsonl(largest.path / rounds.ACCEPTED_ROWS)[20:]

    # Accepted and replayed rows (messages and prompt/completion both) load as the round's data.
    round_exp = rounds.round_experiment(loop.exp, loop.cfg, 0, largest, loop.exp.resolve_path("start"), None)
    pipeline = DataPipeline(round_exp, progress=False)
    templated = pipeline.templated("train", pipeline.raw("train"), loop.tokenizer)
    counts = templated.manifest["counts"]
    assert (counts["rows_in"], counts["rows_out"], counts["rejects"]) == (40, 40, 0)


def test_replay_is_deterministic_and_differs_per_round(make_experiment):
    loop = build_loop(make_experiment)
    cfg = replaying(loop.cfg, 0.5)
    samples = write_samples(loop, distinct_answers(loop, 10))

    def replayed(round_index: int) -> list[int]:
        out = rounds.build_accepted(loop.exp, cfg, round_index, samples, loop.prompts, None, replay=loop.sft_raw)
        return [r["row_id"] for r in jsonl(out.path / rounds.REPLAYED_ROWS)], out

    first, out = replayed(0)
    train = (out.path / rounds.ACCEPTED_ROWS).read_text()
    shutil.rmtree(out.path)  # built again from nothing: the same draw
    again, rebuilt = replayed(0)
    assert not rebuilt.cache_hit and again == first and (rebuilt.path / rounds.ACCEPTED_ROWS).read_text() == train
    assert len(first) == 10
    others = [replayed(r)[0] for r in (1, 2, 3)]
    assert all(len(o) == 10 and o != first for o in others) and len({tuple(o) for o in others}) == 3


def test_replay_enters_the_key_only_when_it_replays(make_experiment):
    loop = build_loop(make_experiment)
    samples = write_samples(loop, distinct_answers(loop, 6))

    def key(fraction, replay):
        return rounds.build_accepted(loop.exp, replaying(loop.cfg, fraction), 0, samples, loop.prompts, None,
                                     replay=replay).key

    # Replay 0: the key of the parameters as they were before replay existed, SFT split given or not.
    before = Store(loop.exp.store_root).key(
        "accepted", {"samples": samples.key, "prompts": loop.prompts["templated"].key},
        {"filters": loop.cfg.filters, "drop_truncated": False, "filter_code": {}, "data": "round"})
    assert key(0.0, None) == key(0.0, loop.sft_raw) == before
    assert accepted_params(["dedup"], True, {}, "round", None) == {
        "filters": ["dedup"], "drop_truncated": True, "filter_code": {}, "data": "round"}
    replay_keys = {key(0.1, loop.sft_raw), key(0.2, loop.sft_raw),
                   key(0.1, dataclasses.replace(loop.sft_raw, key="another-sft-split"))}
    assert len(replay_keys) == 3 and before not in replay_keys
    # The lineage of a loop that replays nothing is what it was; replaying is another lineage.
    lineage = rounds.lineage(loop.exp, loop.cfg, "start")
    assert "replay" not in lineage["loop"]["training"]
    assert rounds.lineage(loop.exp, replaying(loop.cfg, 0.1), "start")["loop"]["training"]["replay"] == 0.1
    with pytest.raises(ValueError, match=r"loop\.training\.replay is 0\.1: the round needs the SFT raw train split"):
        key(0.1, None)


def test_unusable_sft_rows_are_counted_not_fatal(make_experiment):
    good = small_rows(6)
    bad = [{"prompt": f"orphan question {i}"} for i in range(5)] + [{"text": 7}]
    loop = build_loop(make_experiment, rows=good + bad)
    out = rounds.build_accepted(loop.exp, replaying(loop.cfg, 0.5), 0, write_samples(loop, distinct_answers(loop, 12)),
                                loop.prompts, None, replay=loop.sft_raw)
    # 12 wanted, 6 usable: every row drawn; the 6 unusable ones named with the reason.
    assert (out.manifest["replayed_rows"], out.manifest["replay_rejected"]) == (6, 6)
    rejected = jsonl(out.path / rounds.REPLAY_REJECTED_ROWS)
    assert sorted(r["reason"] for r in rejected) == ["missing field 'completion'"] * 5 + ["text: expected string, got int"]
    trained = jsonl(out.path / rounds.ACCEPTED_ROWS)[12:]
    assert sorted(map(json.dumps, trained)) == sorted(json.dumps(as_sft_row(r)) for r in good)


def test_all_rounds_carries_no_earlier_replay(make_experiment):
    """all_rounds: a round keeps the earlier rounds' accepted rows, not their replayed ones, and
    replays its own share of the whole."""
    loop = build_loop(make_experiment)
    cfg = replaying(loop.cfg, 0.5, data="all_rounds")
    round0 = rounds.build_accepted(loop.exp, cfg, 0, write_samples(loop, distinct_answers(loop, 4)), loop.prompts,
                                   None, replay=loop.sft_raw)
    ids = list(loop.prompt_rows)
    round1 = rounds.build_accepted(loop.exp, cfg, 1, write_samples(loop, [(ids[0], " new"), (ids[1], " newer")], 1),
                                   loop.prompts, round0, replay=loop.sft_raw)
    first, second = jsonl(round0.path / rounds.ACCEPTED_ROWS), jsonl(round1.path / rounds.ACCEPTED_ROWS)
    assert round0.manifest["replayed_rows"] == 4 and len(first) == 8
    assert second[:4] == first[:4] and round1.manifest["replayed_rows"] == 6 and len(second) == 12
    assert [r["line"] for r in jsonl(round1.path / rounds.REPLAYED_ROWS)] == list(range(6, 12))


@pytest.mark.parametrize("value, message", [
    (1.0, r"^loop\.training\.replay: must be in \[0, 1\)"),
    (-0.1, r"^loop\.training\.replay: must be in \[0, 1\)"),
    (float("nan"), r"^loop\.training\.replay: must be in \[0, 1\)"),
    ("0.1", r"^loop\.training\.replay: expected float"),
])
def test_bad_replay_is_one_line(value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_loop({"training": {"replay": value}}, tmp_path)
    assert parse_loop({"training": {"replay": 0.25}}, tmp_path).training.replay == 0.25
    assert parse_loop({}, tmp_path).training.replay == 0.0


# -- band ------------------------------------------------------------------------------------------

def random_round(seed: int, prompts: int = 200) -> list[dict]:
    """Prompts of 1 to 8 samples, each prompt with its own pass rate (none, some, all); a few
    samples truncated. A sample passes the verifier when its text says so."""
    rng = random.Random(seed)
    samples = []
    for p in range(prompts):
        rate = rng.choice([0.0, 0.3, 0.7, 1.0, 1.0])
        for i in range(rng.randint(1, 8)):
            samples.append({"prompt_id": f"p{p}", "sample_index": i, "prompt": f"question {p}", "reference": None,
                            "text": f"{'pass' if rng.random() < rate else 'fail'} {i}", "token_count": 3,
                            "stop_reason": "length" if rng.random() < 0.04 else "eot"})
    return samples


@pytest.fixture
def verifier(tmp_path):
    (tmp_path / "checks.py").write_text("def passes(sample, text):\n    return text.startswith('pass')\n")
    return {"verifier": "checks:passes"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_solved", [None, 0.5, 0.8])
def test_band_removes_exactly_the_prompts_solved_too_often(seed, max_solved, verifier, tmp_path):
    samples = random_round(seed)
    band = "band" if max_solved is None else {"band": {"max_solved": max_solved}}
    result = build_pipeline([verifier, band], drop_truncated=True, base_dir=tmp_path).run(samples)

    solved = lambda s: s["text"].startswith("pass") and s["stop_reason"] != "length"  # noqa: E731
    n: dict[str, int] = {}
    c: dict[str, int] = {}
    for s in samples:
        n[s["prompt_id"]] = n.get(s["prompt_id"], 0) + 1
        c[s["prompt_id"]] = c.get(s["prompt_id"], 0) + solved(s)
    removed = {p for p in n if c[p] and (c[p] == n[p] if max_solved is None else c[p] / n[p] > max_solved)}
    assert removed and len(removed) < len({p for p in n if c[p]})  # both kinds occur

    def ids(items):
        return sorted((s["prompt_id"], s["sample_index"]) for s in items)

    assert ids(result.accepted + [r.sample for r in result.rejected]) == ids(samples)
    # Band removes the solving samples of those prompts (their others the verifier rejected already).
    assert ids(r.sample for r in result.rejected if r.filter == "band") == ids(
        s for s in samples if s["prompt_id"] in removed and solved(s))
    assert ids(result.accepted) == ids(s for s in samples if solved(s) and s["prompt_id"] not in removed)
    m = result.metrics()
    assert m["band_removed_samples"] == m["rejected_by"]["band"] == sum(c[p] for p in removed)
    assert m["always_solved_prompts"] == len(removed)
    assert m["accepted"] + sum(m["rejected_by"].values()) == m["samples"] == len(samples)
    for r in result.rejected:
        if r.filter == "band":
            p = r.sample["prompt_id"]
            assert r.reason == (f"prompt solved by all {n[p]} samples" if n[p] > 1 and c[p] == n[p]
                                else "prompt solved by its only sample" if c[p] == n[p]
                                else f"prompt solved by {c[p]} of {n[p]} samples (above max_solved {max_solved:g})")


def test_band_counts_truncated_samples_as_unsolved(verifier, tmp_path):
    samples = [{"prompt_id": "a", "sample_index": i, "prompt": "q", "reference": None, "text": "pass",
                "token_count": 9, "stop_reason": "length" if i == 3 else "eot"} for i in range(4)]
    samples += [{**s, "prompt_id": "b", "stop_reason": "eot"} for s in samples]
    result = build_pipeline([verifier, "dedup", "band"], drop_truncated=True, base_dir=tmp_path).run(samples)
    # a: 3 of 4 solved (one truncated) → kept, then dedup keeps 1; b: 4 of 4 solved, yet dedup before
    # band leaves 1 of 4: band counts what survived the filters before it.
    assert [(s["prompt_id"], s["sample_index"]) for s in result.accepted] == [("a", 0), ("b", 0)]
    result = build_pipeline([verifier, "band", "dedup"], drop_truncated=True, base_dir=tmp_path).run(samples)
    assert [(s["prompt_id"], s["sample_index"]) for s in result.accepted] == [("a", 0)]
    assert [r.reason for r in result.rejected if r.filter == "band"] == ["prompt solved by all 4 samples"] * 4
    # Without band no band metrics.
    assert "band_removed_samples" not in build_pipeline([verifier], drop_truncated=True, base_dir=tmp_path).run(
        samples).metrics()


@pytest.mark.parametrize("specs, message", [
    (["band"], r"^loop\.filters\[0\]\.band: must come after a filter that checks answers \(answer_regex or verifier\)"),
    (["dedup", {"band": {"max_solved": 0.5}}, {"answer_regex": {"pattern": "(\\d+)"}}],
     r"^loop\.filters\[1\]\.band: must come after a filter that checks answers"),
    ([{"best_k": {"k": 1, "scorer": "trainer.data.default_data:verify"}}, "band"],
     r"^loop\.filters\[1\]\.band: must come after"),
    ([{"answer_regex": {"pattern": "(\\d+)"}}, {"band": {"max_solved": 1.0}}],
     r"^loop\.filters\[1\]\.band\.max_solved: expected a fraction in \(0, 1\), got 1\.0"),
    ([{"answer_regex": {"pattern": "(\\d+)"}}, {"band": {"max_solved": 0}}], r"^loop\.filters\[1\]\.band\.max_solved"),
    ([{"answer_regex": {"pattern": "(\\d+)"}}, {"band": {"max_solved": "half"}}], r"^loop\.filters\[1\]\.band\.max_solved"),
    ([{"answer_regex": {"pattern": "(\\d+)"}}, {"band": {"min_solved": 0.1}}],
     r"^loop\.filters\[1\]\.band: unknown key\(s\) \['min_solved'\]"),
])
def test_bad_band_entries_are_one_line(specs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_loop({"filters": specs}, tmp_path)


def test_band_written_as_yaml_parses(tmp_path):
    for band in ("band", {"band": None}, {"band": {}}, {"band": {"max_solved": 0.75}}):
        cfg = parse_loop({"filters": [{"answer_regex": {"pattern": "(\\d+)"}}, band]}, tmp_path)
        assert cfg.filters[1] == band


# -- preference pairs --------------------------------------------------------------------------------

VERIFY = {"verifier": "trainer.data.default_data:verify"}


def test_preference_pairs_pair_accepted_with_wrong_answers(make_experiment):
    loop = build_loop(make_experiment, filters=[VERIFY, "dedup", {"max_per_prompt": 2}])
    rng = random.Random(7)
    answers = []
    for pid, row in loop.prompt_rows.items():
        right = f" {row['reference']}"
        for _ in range(rng.randint(1, 6)):
            answers.append((pid, rng.choice([right, right, f" wrong {rng.randint(0, 3)}", " 0"])))
    out = rounds.build_accepted(loop.exp, loop.cfg, 0, write_samples(loop, answers), loop.prompts, None)
    texts = {(pid, i): t for (pid, t), i in zip(answers, _indices(answers))}
    rejected = {(r["prompt_id"], r["sample_index"]): r["filter"] for r in jsonl(out.path / rounds.REJECTED_ROWS)}
    accepted = {k for k in texts if k not in rejected}
    conversational = jsonl(out.path / rounds.PAIRS)
    standard = jsonl(out.path / rounds.TEXT_PAIRS)
    pairs = conversational + standard
    assert conversational and standard and out.manifest["preference_pairs"] == len(pairs)
    assert out.manifest["preference_pairs_by_file"] == {"pairs.jsonl": len(conversational),
                                                        "pairs_text.jsonl": len(standard)}
    assert {f for f in rejected.values()} >= {"verifier", "dedup"}  # some rejects must not pair
    for p in pairs:
        pid = p["prompt_id"]
        chosen, worse = (pid, p["chosen_sample"]), (pid, p["rejected_sample"])
        assert chosen in accepted and rejected.get(worse) in CORRECTNESS_FILTERS
        asked = rounds._asked_and_trained(loop.exp, loop.prompt_rows[pid]["record"], "")[0]
        assert p["prompt"] == asked
        if isinstance(asked, str):
            assert (p["chosen"], p["rejected"]) == (texts[chosen], texts[worse])
        else:
            assert p["chosen"] == [{"role": "assistant", "content": texts[chosen]}]
            assert p["rejected"] == [{"role": "assistant", "content": texts[worse]}]
    # Per prompt: min(accepted, wrongly answered) pairs, in sample order.
    for pid in loop.prompt_rows:
        good = sorted(i for p, i in accepted if p == pid)
        bad = sorted(i for (p, i), f in rejected.items() if p == pid and f in CORRECTNESS_FILTERS)
        mine = [(p["chosen_sample"], p["rejected_sample"]) for p in pairs if p["prompt_id"] == pid]
        assert mine == list(zip(good, bad))

    # Both files train TRL's DPOTrainer.
    for name in (rounds.PAIRS, rounds.TEXT_PAIRS):
        loss = _dpo_steps(out.path / name, loop.exp.resolve_path(f"dpo-{name}"))
        assert math.isfinite(loss), name


def _indices(answers):
    counts: dict[str, int] = {}
    for pid, _ in answers:
        yield counts.get(pid, 0)
        counts[pid] = counts.get(pid, 0) + 1


def _dpo_steps(pairs_file, output_dir) -> float:
    """Two DPO steps on a tiny Llama from a config, with the project's tiny tokenizer; the loss."""
    import copy

    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from trainer.data.tokenizer_loading import TEMPLATES_DIR, TINY_TOKENIZER_DIR, read_template

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tok.chat_template = read_template(TEMPLATES_DIR / "chatml.jinja")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256))
    dataset = datasets.load_dataset("json", data_files=str(pairs_file), split="train",
                                    cache_dir=str(output_dir / "cache"))
    args = DPOConfig(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, max_length=128)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                         processing_class=tok)
    return trainer.train().training_loss
