"""The embedded default dataset: small generated tasks with checkable short answers.

Nothing is downloaded. `generate(split, rows, seed)` is deterministic and the "test" split is
held out: every problem is assigned to train or test by a hash of the problem itself, so no
prompt of the test split ever appears in the train split (whatever the seeds and row counts).

Tasks (chosen to be learnable by a tiny randomly initialised transformer in minutes on CPU):

- ``add``: two-digit addition, "What is 23 + 45?" -> "68".
- ``convert``: unit conversion by a power of ten, "Convert 7 km to m." -> "7000".
- ``reverse``: reverse the letters of a short lowercase word, written letter by letter so
  that every letter is its own token, "Reverse the letters: c a t" -> "t a c".
- ``upper``: uppercase a short lowercase word, letter by letter, "Uppercase: c a t" -> "C A T".

`builtin: few_shot` asks the same questions after two solved problems of the same task (earlier
turns of one conversation), for pretrained models that do not know the answer format.

Records come in two formats, mixed in one list (the pipeline detects the format per record):

- conversational: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``,
  some with a system message first, some with two question/answer pairs;
- prompt/completion strings: ``{"prompt": "What is 23 + 45?\\nAnswer:", "completion": " 68"}``.

Every record also carries ``"answer"`` (the exact expected final answer, i.e. the last
assistant message or the completion without its leading space) and ``"task"`` (the task of
that final question).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from typing import Any, Callable

SPLITS = ("train", "test")
TASKS = ("add", "convert", "reverse", "upper")
# Relative frequency of each task among generated questions.
TASK_WEIGHTS = {"add": 0.35, "convert": 0.2, "reverse": 0.25, "upper": 0.2}
# 1 problem in TEST_BUCKETS (by hash) belongs to the held-out split.
TEST_BUCKETS = 10

DEFAULT_TRAIN_ROWS = 6000
DEFAULT_TEST_ROWS = 200

SYSTEM_PROMPTS = (
    "You are a helpful assistant. Reply with the answer only.",
    "Answer concisely.",
)

# (from unit, to unit, factor): conversions by a power of ten only.
CONVERSIONS = (
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("cm", "mm", 10),
    ("kg", "g", 1000),
    ("L", "mL", 1000),
    ("t", "kg", 1000),
)

WORD_MIN_LEN = 3
WORD_MAX_LEN = 5

# Shares of the record formats (the rest is single-turn conversations without system).
P_PROMPT_COMPLETION = 0.35
P_MULTI_TURN = 0.15
P_SYSTEM = 0.3


def problem_split(task: str, key: Any) -> str:
    """The split a problem belongs to, from a hash of the problem (stable across runs)."""
    digest = hashlib.sha256(json.dumps([task, key]).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def spaced(word: str) -> str:
    return " ".join(word)


# --- problems: key -> (question, answer) --------------------------------------------------


def _sample_add(rng: random.Random) -> tuple:
    return (rng.randint(10, 99), rng.randint(10, 99))


def _render_add(key: tuple) -> tuple[str, str]:
    a, b = key
    return f"What is {a} + {b}?", str(a + b)


def _sample_convert(rng: random.Random) -> tuple:
    return (rng.randrange(len(CONVERSIONS)), rng.randint(1, 99))


def _render_convert(key: tuple) -> tuple[str, str]:
    i, n = key
    src, dst, factor = CONVERSIONS[i]
    return f"Convert {n} {src} to {dst}.", str(n * factor)


def _sample_word(rng: random.Random) -> tuple:
    n = rng.randint(WORD_MIN_LEN, WORD_MAX_LEN)
    return ("".join(rng.choice(string.ascii_lowercase) for _ in range(n)),)


def _render_reverse(key: tuple) -> tuple[str, str]:
    (word,) = key
    return f"Reverse the letters: {spaced(word)}", spaced(word[::-1])


def _render_upper(key: tuple) -> tuple[str, str]:
    (word,) = key
    return f"Uppercase: {spaced(word)}", spaced(word.upper())


_TASKS: dict[str, tuple[Callable[[random.Random], tuple], Callable[[tuple], tuple[str, str]]]] = {
    "add": (_sample_add, _render_add),
    "convert": (_sample_convert, _render_convert),
    "reverse": (_sample_word, _render_reverse),
    "upper": (_sample_word, _render_upper),
}


def solve(task: str, question: str) -> str:
    """Recompute the answer of a question from its text alone (used by tests and checks)."""
    if task == "add":
        a, b = question.removeprefix("What is ").removesuffix("?").split(" + ")
        return str(int(a) + int(b))
    if task == "convert":
        n, src, _to, dst = question.removeprefix("Convert ").removesuffix(".").split(" ")
        factor = {(s, d): f for s, d, f in CONVERSIONS}[(src, dst)]
        return str(int(n) * factor)
    if task == "reverse":
        return spaced(question.removeprefix("Reverse the letters: ").replace(" ", "")[::-1])
    if task == "upper":
        return spaced(question.removeprefix("Uppercase: ").replace(" ", "").upper())
    raise ValueError(f"unknown task {task!r}")


# The start of each task's question, for telling the task from the question alone.
QUESTION_PREFIXES = {"add": "What is ", "convert": "Convert ", "reverse": "Reverse the letters: ",
                     "upper": "Uppercase: "}


def question_task(question: str) -> str:
    for task, prefix in QUESTION_PREFIXES.items():
        if question.startswith(prefix):
            return task
    raise ValueError(f"not a question of the default tasks: {question!r}")


def final_question(prompt: str | list[dict]) -> str:
    """The question a prompt asks last: a prompt string without its "\nAnswer:" cue, or the
    content of a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt.removesuffix("\nAnswer:")
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


def verify(record: dict, text: str) -> bool:
    """Verifier for the generation loop (`verifier: trainer.data.default_data:verify`): whether
    `text` is the answer to the last question of the record's `prompt`, recomputed by `solve`."""
    question = final_question(record["prompt"])
    return text.strip() == solve(question_task(question), question)


def _problem(rng: random.Random, split: str) -> tuple[str, str, str]:
    """A random (task, question, answer) whose problem belongs to `split`."""
    task = rng.choices(TASKS, weights=[TASK_WEIGHTS[t] for t in TASKS])[0]
    sample, render = _TASKS[task]
    while True:
        key = sample(rng)
        if problem_split(task, key) == split:
            question, answer = render(key)
            return task, question, answer


def _record(rng: random.Random, split: str) -> dict:
    u = rng.random()
    task, question, answer = _problem(rng, split)
    if u < P_PROMPT_COMPLETION:
        return {"prompt": f"{question}\nAnswer:", "completion": f" {answer}",
                "answer": answer, "task": task}
    messages: list[dict[str, str]] = []
    if rng.random() < P_SYSTEM:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if u < P_PROMPT_COMPLETION + P_MULTI_TURN:
        _, q0, a0 = _problem(rng, split)
        messages += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "answer": answer, "task": task}


FEW_SHOT_EXAMPLES = 2


def _few_shot_record(rng: random.Random, split: str) -> dict:
    """A question asked after FEW_SHOT_EXAMPLES solved problems of the same task, as earlier
    turns of the conversation: the examples show the answer's format, so a pretrained instruct
    model answers in it some of the time without being trained (`builtin: few_shot`)."""
    task, question, answer = _problem(rng, split)
    sample, render = _TASKS[task]
    messages: list[dict[str, str]] = []
    for _ in range(FEW_SHOT_EXAMPLES):
        q, a = render(sample(rng))  # any problem: only the final question must belong to the split
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "answer": answer, "task": task}


def _records(kind: str, make: Callable[[random.Random, str], dict], split: str, rows: int, seed: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if rows < 0:
        raise ValueError("rows must be >= 0")
    rng = random.Random(f"sftdag-{kind}:{split}:{seed}")
    return [make(rng, split) for _ in range(rows)]


def generate(split: str, rows: int, seed: int = 0) -> list[dict]:
    """`rows` records of the given split ("train" or "test"), deterministic in (split, seed)."""
    return _records("default", _record, split, rows, seed)


def generate_few_shot(split: str, rows: int, seed: int = 0) -> list[dict]:
    """`rows` few-shot conversations (`_few_shot_record`), deterministic in (split, seed); the final
    questions of the "test" split are held-out problems like `generate`'s."""
    return _records("few-shot", _few_shot_record, split, rows, seed)


# `data.source.builtin` names: the embedded datasets.
BUILTIN_DATASETS = {"default": generate, "few_shot": generate_few_shot}
