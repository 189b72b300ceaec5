"""The embedded default dataset and the shipped tiny tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from trainer.data import default_data as dd

ROOT = Path(__file__).resolve().parents[1]
TOK_DIR = ROOT / "trainer" / "resources" / "tiny_tokenizer"


def _questions(rec: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of a record."""
    if "messages" in rec:
        msgs = [m for m in rec["messages"] if m["role"] != "system"]
        return [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]
    return [(rec["prompt"].removesuffix("\nAnswer:"), rec["completion"][1:])]


def _task_of(question: str) -> str:
    for prefix, task in (("What is ", "add"), ("Convert ", "convert"),
                         ("Reverse the letters: ", "reverse"), ("Uppercase: ", "upper")):
        if question.startswith(prefix):
            return task
    raise AssertionError(f"unknown question {question!r}")


def test_deterministic():
    assert dd.generate("train", 300, seed=3) == dd.generate("train", 300, seed=3)
    assert dd.generate("test", 100) == dd.generate("test", 100)
    assert dd.generate("train", 300, seed=3) != dd.generate("train", 300, seed=4)
    # A prefix of a longer run is the shorter run.
    assert dd.generate("train", 500)[:200] == dd.generate("train", 200)


def test_deterministic_across_processes():
    code = ("import json; from trainer.data import default_data as d; "
            "print(json.dumps(d.generate('train', 50, seed=1)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert json.loads(out) == dd.generate("train", 50, seed=1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        dd.generate("validation", 10)
    with pytest.raises(ValueError):
        dd.generate("train", -1)
    assert dd.generate("test", 0) == []


def test_train_test_disjoint():
    train = {q for r in dd.generate("train", 20000) for q, _ in _questions(r)}
    for seed in (0, 1):
        test = {q for r in dd.generate("test", 2000, seed=seed) for q, _ in _questions(r)}
        assert not train & test
    # Whole prompts too (prompt strings and user turns).
    train_prompts = {r.get("prompt") for r in dd.generate("train", 5000)} - {None}
    test_prompts = {r.get("prompt") for r in dd.generate("test", 1000)} - {None}
    assert train_prompts and test_prompts and not train_prompts & test_prompts


def test_answers_correct():
    for split in dd.SPLITS:
        for rec in dd.generate(split, 3000, seed=7):
            pairs = _questions(rec)
            assert pairs
            for q, a in pairs:
                assert dd.solve(_task_of(q), q) == a
            q, a = pairs[-1]
            assert rec["answer"] == a
            assert rec["task"] == _task_of(q)


def test_answers_by_hand():
    assert dd.solve("add", "What is 23 + 45?") == "68"
    assert dd.solve("convert", "Convert 7 km to m.") == "7000"
    assert dd.solve("reverse", "Reverse the letters: c a t") == "t a c"
    assert dd.solve("upper", "Uppercase: c a t") == "C A T"


def test_format_mix():
    recs = dd.generate("train", 2000)
    kinds = Counter()
    for r in recs:
        assert set(r) in ({"messages", "answer", "task"}, {"prompt", "completion", "answer", "task"})
        if "prompt" in r:
            assert r["prompt"].endswith("\nAnswer:")
            assert r["completion"] == " " + r["answer"]
            kinds["prompt_completion"] += 1
            continue
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and r["messages"][-1]["content"] == r["answer"]
        if roles[0] == "system":
            kinds["system"] += 1
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        kinds["multi_turn" if len(roles) == 4 else "single_turn"] += 1
    for k in ("prompt_completion", "system", "multi_turn", "single_turn"):
        assert kinds[k] >= 100, kinds
    tasks = Counter(r["task"] for r in recs)
    assert set(tasks) == set(dd.TASKS) and min(tasks.values()) >= 200, tasks


def test_test_split_has_all_tasks():
    tasks = Counter(r["task"] for r in dd.generate("test", dd.DEFAULT_TEST_ROWS))
    assert set(tasks) == set(dd.TASKS)


# --- tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOK_DIR))


def test_tokenizer_special_tokens(tok):
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert not tok.chat_template
    vocab = tok.get_vocab()
    assert 384 <= len(tok) <= 1024
    for t in ("<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert t not in vocab
    # No automatic BOS/EOS.
    ids = tok("What is 1 + 2?")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    # Special tokens written in text are recognised as single tokens.
    ids = tok("<s>hi</s>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_tokenizer_digits_individual(tok):
    toks = tok.convert_ids_to_tokens(tok("Convert 1234 km to m.")["input_ids"])
    assert [t for t in toks if any(c.isdigit() for c in t)] == ["1", "2", "3", "4"]


def test_tokenizer_round_trip(tok):
    texts = []
    for split in dd.SPLITS:
        for r in dd.generate(split, 500, seed=5):
            texts += [m["content"] for m in r["messages"]] if "messages" in r else [r["prompt"], r["completion"]]
            if "prompt" in r:
                texts.append("<s>" + r["prompt"] + r["completion"] + "</s>")
    texts += ["  leading spaces\n\nand newlines \n", "\tTabs, ümlauts & emoji 🙂", ""]
    for s in texts:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_tokenizer_files_match_script(tmp_path):
    """The committed tokenizer is exactly what the build script produces."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_tokenizer.py"),
                    "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(p.name for p in TOK_DIR.iterdir())
    for name in built:
        assert (tmp_path / name).read_bytes() == (TOK_DIR / name).read_bytes(), name


def test_verify_accepts_exactly_the_right_answer_over_every_task():
    """The default loop's verifier: the answer recomputed from the question, whatever the
    record's format (a prompt string, or a conversation's last user turn), nothing else."""
    from trainer.data.default_data import solve, verify

    records = dd.generate("train", 200, seed=5)
    for record in records:
        prompt = record["prompt"] if "prompt" in record else record["messages"][:-1]
        question = dd.final_question(prompt)
        right = solve(dd.question_task(question), question)
        assert verify({"prompt": prompt}, f" {right}") and right == record["answer"]
        assert not verify({"prompt": prompt}, right + "0")
    assert {dd.question_task(dd.final_question(r.get("prompt") or r["messages"][:-1])) for r in records} == set(dd.TASKS)
