"""Scorers: how a held-out answer is judged against its reference, one protocol for all.

YAML (top level of the experiment; left out: `[exact]`, or, for a loop whose filters name a
verifier, that verifier):

    eval:
      scorers:
        - exact                                       # strip both, compare
        - answer_regex: {pattern: "(\\d+(?: \\d+)*)\\s*$"}   # first group (or whole match) of the
                                                      # answer equals the reference's (or the whole
                                                      # reference when it has no match); compared
                                                      # as the loop's answer_regex filter compares
                                                      # (whitespace collapsed, case folded)
        - verifier: checks:verify                     # function(sample, text) -> bool (or 0/1),
                                                      # resolved as the loop's verifier filter is

A scorer gives each answer one of `pass`, `fail`, `error` (it raised, or returned something that
is neither a bool nor the number 0 or 1); an error is never a pass and is counted apart from the
fails. A scorer that does not import, or errors on every row, fails the scoring in one line
naming the scorer and the first failing row (`ScorerError`). The first scorer is the headline one
(`accuracy_merged`, the loop's pass@k). A scorer is handed the sample the loop's filters hand a
verifier (`scorer_sample`): `prompt` what the row asked (a prompt string, or the conversation
before its answer), `rendered_prompt` the text generation was given, `reference`, `text` (the
answer), `row`, `prompt_id`, and `task` where the row has one; a held-out file written before
rows carried what they asked hands the rendered prompt as `prompt`. Where rows carry a task, each
scorer's report also counts per task (`by_task`).

Nothing here loads a model or imports torch: the orchestrator plans keys with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from trainer.core.answers import answer_pattern
from trainer.core.config import ConfigError

PASS, FAIL, ERROR = "pass", "fail", "error"
DEFAULT = ("exact",)
KINDS = ("exact", "answer_regex", "verifier")


class ScorerError(ConfigError):
    """A scorer that cannot be used: it does not import, or it erred on every row (one line)."""


@dataclass(frozen=True)
class Scorer:
    id: str  # its name in reports: the kind, `<kind>_<i>` for a second one of the same kind
    kind: str
    where: str  # `eval.scorers[0].verifier`
    spec: Any  # as written in the YAML
    check: Callable[[dict, str], Any] = field(compare=False, repr=False)
    function: Any = field(default=None, compare=False, repr=False)  # a verifier's function

    @property
    def label(self) -> str:
        """`eval.scorers[0].verifier 'm:f'`: what error messages name."""
        if self.kind == "exact":
            return self.where
        option = self.spec["verifier"] if self.kind == "verifier" else self.spec["answer_regex"]["pattern"]
        return f"{self.where} {option!r}"

    def judge(self, sample: dict, text: str) -> tuple[str, str | None]:
        """(pass | fail | error, the error's text)."""
        try:
            verdict = self.check(sample, text)
        except Exception as e:  # a user's verifier may raise anything: an error, counted apart
            return ERROR, f"{type(e).__name__}: {' '.join(str(e).split())}"
        return as_outcome(verdict)


def as_outcome(verdict: Any) -> tuple[str, str | None]:
    """A scorer's return value as an outcome: True/1 pass, False/0 fail, anything else an error."""
    if isinstance(verdict, bool):
        return (PASS if verdict else FAIL), None
    if isinstance(verdict, (int, float)) and not (isinstance(verdict, float) and math.isnan(verdict)):
        if verdict == 1:
            return PASS, None
        if verdict == 0:
            return FAIL, None
    return ERROR, f"returned {verdict!r}, expected a bool (or 0/1)"


# -- building scorers from their YAML entries -----------------------------------------------------

def _exact(sample: dict, text: str) -> bool:
    return text.strip() == str(sample["reference"]).strip()


def _answer_regex(options: Any, where: str) -> Callable[[dict, str], bool]:
    if not isinstance(options, dict) or set(options) != {"pattern"}:
        raise ConfigError(f"{where}: expected {{pattern: REGEX}}, got {options!r}")
    pattern = answer_pattern(options["pattern"], where)  # as the loop's answer_regex filter compares

    def check(sample: dict, given: str) -> bool:
        got = pattern.answer(given)
        reference = "" if sample.get("reference") is None else str(sample["reference"])
        return got is not None and got == pattern.expected(reference)

    return check


def _verifier(dotted: Any, where: str, base_dir: Path) -> Any:
    if not isinstance(dotted, str):
        raise ConfigError(f"{where}: expected 'package.module:function', got {dotted!r}")
    from trainer.core.user_code import resolve_function  # as the loop's filters resolve it, beside the YAML too

    try:
        fn = resolve_function(dotted, base_dir)
    except Exception as e:  # not found, or its module's own code failed while importing
        raise ScorerError(f"{where} {dotted!r}: cannot import: {type(e).__name__}: {' '.join(str(e).split())}"
                          ) from None
    if not callable(fn):
        raise ScorerError(f"{where} {dotted!r}: is not callable")
    return fn


def build_scorers(specs: Sequence[Any] | None, base_dir: str | Path = ".", where: str = "eval.scorers"
                  ) -> list[Scorer]:
    """The scorers of YAML entries `specs` (None: `[exact]`); a bad entry raises ConfigError
    naming `<where>[i]`, a verifier that does not import ScorerError."""
    if specs is None:
        specs = list(DEFAULT)
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ConfigError(f"{where}: expected a non-empty list of scorers ({', '.join(KINDS)}), got {specs!r}")
    scorers: list[Scorer] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        kind, at, check, function = _scorer(spec, f"{where}[{i}]", Path(base_dir))
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
        scorers.append(Scorer(name, kind, at, spec, check, function))
    return scorers


def _scorer(spec: Any, entry: str, base_dir: Path) -> tuple[str, str, Callable[[dict, str], Any], Any]:
    """(kind, where its options are, its check, a verifier's function) of the YAML entry at `entry`."""
    if isinstance(spec, str):
        if spec != "exact":
            raise ConfigError(f"{entry}: unknown scorer {spec!r}" + (
                f" (it needs options: `{spec}: ...`)" if spec in KINDS else f"; known: {list(KINDS)}"))
        kind, options = "exact", None
    elif isinstance(spec, dict) and len(spec) == 1:
        ((kind, options),) = spec.items()
        if kind not in KINDS:
            raise ConfigError(f"{entry}: unknown scorer {kind!r}; known: {list(KINDS)}")
        if kind == "exact" and options is not None:
            raise ConfigError(f"{entry}.exact: takes no options; write it as `- exact`")
    else:
        raise ConfigError(f"{entry}: expected a scorer name or a one-key mapping {{scorer: options}}, got {spec!r}")
    at = f"{entry}.{kind}" if kind != "exact" else entry
    if kind == "exact":
        return kind, at, _exact, None
    if kind == "answer_regex":
        return kind, at, _answer_regex(options, at), None
    function = _verifier(options, at, base_dir)
    return kind, at, function, function


def scorer_specs(exp: Any) -> tuple[list[Any], str]:
    """(the experiment's scorer entries, where they come from): `eval.scorers` when given, else
    the first `verifier:` among the loop's filters (`loop.filters[i]`: held-out rows carry the
    question as the loop's filters hand it), else `[exact]`."""
    configured = getattr(getattr(exp, "eval", None), "scorers", None)
    if configured is not None:
        return list(configured), "eval.scorers"
    # The loop's section as written (the loop's own parsing lives above trainer/training).
    loop = getattr(exp, "loop", None)
    filters = loop.get("filters") if isinstance(loop, dict) else None
    for i, entry in enumerate(filters if isinstance(filters, list) else []):
        if isinstance(entry, dict) and "verifier" in entry:
            dotted = entry["verifier"]
            if not isinstance(dotted, str):
                raise ConfigError(f"loop.filters[{i}].verifier: expected 'package.module:function', got {dotted!r}")
            return [{"verifier": dotted}], f"loop.filters[{i}]"
    return list(DEFAULT), "eval.scorers"


def experiment_scorers(exp: Any) -> list[Scorer]:
    """The experiment's scorers (`scorer_specs`), built."""
    specs, where = scorer_specs(exp)
    return scorers_at(specs, where, exp.base_dir)


def scorers_at(specs: Sequence[Any], where: str, base_dir: str | Path) -> list[Scorer]:
    """`build_scorers`, where `where` may be the loop filter a default verifier comes from
    (`loop.filters[2]`: named as the loop names it, `loop.filters[2].verifier 'm:f'`)."""
    if where.startswith("loop.filters["):
        (spec,) = specs
        kind, at, check, function = _scorer(spec, where, Path(base_dir))
        return [Scorer(kind, kind, at, spec, check, function)]
    return build_scorers(specs, base_dir, where)


def scorers_identity(scorers: Sequence[Scorer]) -> list[dict[str, Any]]:
    """What the scorers enter the score key as: each entry as written, and a verifier's code
    (`trainer.core.identity.code_identity`: its module and the project modules it imports)."""
    from trainer.core.identity import code_identity

    out = []
    for s in scorers:
        item: dict[str, Any] = {"id": s.id, "spec": s.spec}
        if s.function is not None:
            item["code"] = code_identity(s.function)
        out.append(item)
    return out


# -- scoring --------------------------------------------------------------------------------------

def judge_all(scorer: Scorer, samples: Sequence[dict], texts: Sequence[str] | None = None
              ) -> list[tuple[str, str | None]]:
    """Every sample's outcome by `scorer` (the text: `texts[i]`, else `sample["text"]`). Raises
    ScorerError when the scorer erred on every one (naming the first)."""
    texts = [s["text"] for s in samples] if texts is None else list(texts)
    outcomes = [scorer.judge(s, t) for s, t in zip(samples, texts)]
    if outcomes and all(o == ERROR for o, _ in outcomes):
        raise ScorerError(f"{scorer.label}: row {samples[0].get('row', 0)}: {outcomes[0][1]}")
    return outcomes


@dataclass(frozen=True)
class Tally:
    passed: int
    failed: int
    errors: int
    first_error: str | None = None

    @property
    def rows(self) -> int:
        return self.passed + self.failed + self.errors

    @property
    def pass_rate(self) -> float:
        return self.passed / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"pass_rate": self.pass_rate, "passed": self.passed, "failed": self.failed, "errors": self.errors,
                "first_error": self.first_error}


def tally(outcomes: Iterable[tuple[str, str | None]], rows: Sequence[dict] | None = None) -> Tally:
    counts = {PASS: 0, FAIL: 0, ERROR: 0}
    first = None
    for i, (o, why) in enumerate(outcomes):
        counts[o] += 1
        if o == ERROR and first is None:
            first = f"row {rows[i].get('row', i) if rows else i}: {why}"
    return Tally(counts[PASS], counts[FAIL], counts[ERROR], first)


def scorer_sample(row: dict, text: str, index: int) -> dict[str, Any]:
    """What a scorer is handed for the answer `text` to the held-out row `row` (`load_held_out`'s
    or a held_out.jsonl line) at position `index`: `prompt` is what the row asked, as the loop's
    filters hand a verifier (the rendered prompt for a row that does not say), `rendered_prompt`
    the text generation was given."""
    asked = row.get("asked")
    sample = {"prompt": row["prompt"] if asked is None else asked, "rendered_prompt": row["prompt"],
              "reference": row["reference"], "text": text, "row": index, "prompt_id": row.get("row_id", index)}
    if row.get("task") is not None:
        sample["task"] = row["task"]
    return sample


NO_TASK = "(no task)"  # in `by_task`: the rows without one, when others have one


def score_answers(scorers: Sequence[Scorer], rows: Sequence[dict], answers: Sequence[str]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({scorer id: pass rate, fail and error counts, and `by_task` {task: the same} when rows
    carry a task}, the scored answers: one record per row with its prompt id, reference, answer,
    task (when it has one) and each scorer's outcome)."""
    if len(rows) != len(answers):
        raise ValueError(f"score_answers: {len(answers)} answers for {len(rows)} rows")
    samples = [scorer_sample(r, a, i) for i, (r, a) in enumerate(zip(rows, answers))]
    tasks = [s.get("task", NO_TASK) for s in samples] if any("task" in s for s in samples) else None
    report: dict[str, Any] = {}
    records = [{"row": s["row"], "prompt_id": s["prompt_id"], "reference": s["reference"], "answer": s["text"],
                **({"task": s["task"]} if "task" in s else {}), "outcomes": {}} for s in samples]
    for scorer in scorers:
        outcomes = judge_all(scorer, samples)
        report[scorer.id] = {"scorer": scorer.spec, **tally(outcomes, samples).to_dict()}
        if tasks is not None:
            report[scorer.id]["by_task"] = {task: {k: v for k, v in tally(
                [o for o, t in zip(outcomes, tasks) if t == task]).to_dict().items() if k != "first_error"}
                for task in sorted(set(tasks), key=str)}
        for record, (o, why) in zip(records, outcomes):
            record["outcomes"][scorer.id] = o
            if why is not None:
                record.setdefault("errors", {})[scorer.id] = why
    return report, records


# -- pass@k ---------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from `n` samples of which `c` pass (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no large binomials)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds the {n} samples")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
