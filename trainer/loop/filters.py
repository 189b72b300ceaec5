"""Which generated samples a round keeps: the filters named in `loop.filters`, run in order.

A sample is a dict with at least `prompt_id`, `prompt` (a string or a messages list), `text`
(the generated answer), `token_count` and `stop_reason` (`"length"` when generation stopped at
max_new_tokens), plus `reference` (may be None) for answer checks. Each filter sees the samples
the filters before it kept; every sample a filter drops is returned with that filter's name and
the reason, so accepted + rejected = input, always.

Filter entries (YAML list items), in any order:

    - answer_regex: {pattern: "#### (-?\\d+)"}   # first group (or the whole match) of the sample
                                                  # equals the reference's (or the whole reference)
    - verifier: package.module:function          # function(sample, text) -> bool
    - length: {min_tokens: 1, max_tokens: 200}    # bounds on token_count (either may be left out)
    - dedup                                       # one sample per normalised text, per prompt
    - max_per_prompt: 4                           # the first k kept samples of each prompt
    - best_k: {k: 1, scorer: package.module:function}   # the k highest scores per prompt
    - band                                        # drop prompts every sample solved (too easy to
                                                  # teach anything); {max_solved: 0.75}: those solved
                                                  # by more than 75% of their samples

`band` counts a sample as solving its prompt when it survived the filters before `band`, so it
comes after answer_regex or verifier (and best read right after it): a prompt's fraction solved
is its surviving samples over all its samples in the input (truncated ones included). Prompts no
sample solved have nothing left to remove; those left in between are where a round learns.

Truncated samples (stop_reason "length") are dropped first unless `drop_truncated` is false.
A dotted path that does not import as a module may name a file beside the experiment YAML
(`checks:verify` → `<yaml folder>/checks.py`). A scorer scores every input sample (the score is
kept in the sample as `score`), so a round's metrics compare the mean score of all samples
with that of the kept ones.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trainer.core.answers import answer_pattern, normalize
from trainer.core.config import ConfigError
from trainer.core.user_code import resolve_function

# What generation writes as stop_reason when a sample hit max_new_tokens.
STOP_LENGTH = "length"
REQUIRED_KEYS = ("prompt_id", "text", "token_count", "stop_reason")

Kept = list[dict]
Dropped = list[tuple[dict, str]]

# Filters that judge whether an answer is right; `band` needs one before it to know what solved a prompt.
SOLVING_FILTERS = ("answer_regex", "verifier")
# Filters whose rejects are worse answers (best_k: lower scored), the rejected side of preference
# pairs; dedup, max_per_prompt, band, length and truncation reject answers that may be right.
CORRECTNESS_FILTERS = (*SOLVING_FILTERS, "best_k")


@dataclass(frozen=True)
class Rejection:
    sample: dict
    filter: str
    reason: str


@dataclass
class FilterResult:
    accepted: list[dict]
    rejected: list[Rejection]
    filters: tuple[str, ...] = ()  # the pipeline's filter names, in order

    def metrics(self) -> dict[str, Any]:
        """The round's figures, from the input (accepted + rejected) and the accepted set."""
        samples = self.accepted + [r.sample for r in self.rejected]
        n = len(samples)
        prompts = {s["prompt_id"] for s in samples}
        covered = {s["prompt_id"] for s in self.accepted}
        distinct = {(s["prompt_id"], normalize(s["text"])) for s in samples}
        rejected_by: dict[str, int] = {}
        for r in self.rejected:
            rejected_by[r.filter] = rejected_by.get(r.filter, 0) + 1
        out: dict[str, Any] = {
            "prompts": len(prompts),
            "samples": n,
            "accepted": len(self.accepted),
            "acceptance_rate": _ratio(len(self.accepted), n),
            "coverage": _ratio(len(covered), len(prompts)),
            "accepted_per_prompt": _ratio(len(self.accepted), len(prompts)),
            "duplicate_rate": _ratio(n - len(distinct), n),
            "truncation_rate": _ratio(sum(s["stop_reason"] == STOP_LENGTH for s in samples), n),
            "mean_sample_tokens": _ratio(sum(s["token_count"] for s in samples), n),
            "rejected_by": rejected_by,
        }
        if "band" in self.filters:
            band = [r.sample["prompt_id"] for r in self.rejected if r.filter == "band"]
            out["band_removed_samples"] = len(band)
            out["always_solved_prompts"] = len(set(band))  # with max_solved: those solved more often than it
        if samples and "score" in samples[0]:
            out["mean_score_all"] = _ratio(sum(s["score"] for s in samples), n)
            out["mean_score_kept"] = (sum(s["score"] for s in self.accepted) / len(self.accepted)
                                      if self.accepted else None)
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


@dataclass(frozen=True)
class Filter:
    name: str
    # Survivors of the filters before → (kept, [(sample, reason)]), kept in input order.
    apply: Callable[[list[dict]], tuple[Kept, Dropped]]
    # best_k's scorer: the pipeline scores every input sample with it before filtering.
    scorer: Callable[[dict], float] | None = None
    # band: `apply(samples, {prompt_id: its number of samples in the pipeline's input})`.
    counts_input: bool = False


def _per_sample(name: str, reject_reason: Callable[[dict], str | None]) -> Filter:
    def apply(samples: list[dict]) -> tuple[Kept, Dropped]:
        kept, dropped = [], []
        for s in samples:
            reason = reject_reason(s)
            if reason is None:
                kept.append(s)
            else:
                dropped.append((s, reason))
        return kept, dropped

    return Filter(name, apply)


@dataclass(frozen=True)
class FilterPipeline:
    filters: tuple[Filter, ...]

    def run(self, samples: list[dict]) -> FilterResult:
        for i, s in enumerate(samples):
            missing = [k for k in REQUIRED_KEYS if k not in s]
            if missing:
                raise ValueError(f"sample {i} (prompt_id {s.get('prompt_id')!r}): missing key(s) {missing}")
        scorer = next((f.scorer for f in self.filters if f.scorer), None)
        alive = [{**s, "score": scorer(s)} for s in samples] if scorer else list(samples)
        input_counts = Counter(s["prompt_id"] for s in samples)
        rejected: list[Rejection] = []
        for f in self.filters:
            alive, dropped = f.apply(alive, input_counts) if f.counts_input else f.apply(alive)
            rejected += [Rejection(s, f.name, reason) for s, reason in dropped]
        return FilterResult(alive, rejected, tuple(f.name for f in self.filters))


def build_pipeline(specs: list, *, drop_truncated: bool, base_dir: Path,
                   where: str = "loop.filters") -> FilterPipeline:
    """The pipeline of YAML filter entries `specs`; a bad entry raises ConfigError naming
    `<where>[i].<filter>`."""
    if not isinstance(specs, list):
        raise ConfigError(f"{where}: expected a list of filters, got {type(specs).__name__}")
    builders: dict[str, Callable[[Any, str], Filter]] = {
        **_BUILDERS,
        "verifier": lambda options, key: _verifier(options, key, base_dir),
        "best_k": lambda options, key: _best_k(options, key, base_dir),
    }
    known = sorted([*builders, *_WITHOUT_OPTIONS, *_OPTIONAL_OPTIONS])
    filters = [_drop_truncated()] if drop_truncated else []
    for i, spec in enumerate(specs):
        entry = f"{where}[{i}]"
        if isinstance(spec, str):
            if spec in _WITHOUT_OPTIONS:
                filters.append(_WITHOUT_OPTIONS[spec]())
                continue
            if spec in _OPTIONAL_OPTIONS:
                filters.append(_after_a_solving_filter(_OPTIONAL_OPTIONS[spec](None, f"{entry}.{spec}"), filters, entry))
                continue
            if spec in builders:
                raise ConfigError(f"{entry}: filter {spec!r} needs options ({spec}: ...)")
            raise ConfigError(f"{entry}: unknown filter {spec!r}; known: {known}")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{entry}: expected a filter name or a one-key mapping {{filter: options}}, got {spec!r}")
        ((name, options),) = spec.items()
        if name in _WITHOUT_OPTIONS:
            raise ConfigError(f"{entry}.{name}: takes no options; write it as `- {name}`")
        if name in _OPTIONAL_OPTIONS:
            filters.append(_after_a_solving_filter(_OPTIONAL_OPTIONS[name](options, f"{entry}.{name}"), filters, entry))
            continue
        if name not in builders:
            raise ConfigError(f"{entry}: unknown filter {name!r}; known: {known}")
        f = builders[name](options, f"{entry}.{name}")
        if f.scorer and any(g.scorer for g in filters):
            raise ConfigError(f"{entry}.{name}: only one best_k filter per pipeline (a sample has one score)")
        filters.append(f)
    return FilterPipeline(tuple(filters))


def _after_a_solving_filter(f: Filter, before: list[Filter], entry: str) -> Filter:
    if not any(g.name in SOLVING_FILTERS for g in before):
        raise ConfigError(f"{entry}.{f.name}: must come after a filter that checks answers "
                          f"({' or '.join(SOLVING_FILTERS)}): it counts the samples they keep as solved")
    return f


def _options(options: Any, where: str, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: expected a mapping with {sorted(allowed)}, got {options!r}")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(options))
    if missing:
        raise ConfigError(f"{where}: missing {missing}")
    return options


def _count(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def _drop_truncated() -> Filter:
    return _per_sample("truncated", lambda s: f"stopped at max_new_tokens ({s['token_count']} tokens)"
                       if s["stop_reason"] == STOP_LENGTH else None)


def _answer_regex(options: Any, where: str) -> Filter:
    pattern = answer_pattern(_options(options, where, {"pattern"}, {"pattern"})["pattern"], where)

    def reject_reason(s: dict) -> str | None:
        if s.get("reference") is None:
            return "prompt has no reference to check the answer against"
        got = pattern.answer(s["text"])
        if got is None:
            return f"no answer matching {pattern.text!r}"
        want = pattern.expected(str(s["reference"]))
        return None if got == want else f"answer {got!r} != reference {want!r}"

    return _per_sample("answer_regex", reject_reason)


def _verifier(dotted: Any, where: str, base_dir: Path) -> Filter:
    fn = _load_function(dotted, where, base_dir, "(sample, text) -> bool")

    def reject_reason(s: dict) -> str | None:
        verdict = fn(s, s["text"])
        if not isinstance(verdict, bool):
            raise ValueError(f"{where} {dotted}: returned {verdict!r} for prompt_id {s['prompt_id']!r}, expected bool")
        return None if verdict else f"{dotted} returned False"

    return _per_sample("verifier", reject_reason)


def _length(options: Any, where: str) -> Filter:
    opts = _options(options, where, {"min_tokens", "max_tokens"}, set())
    if not opts:
        raise ConfigError(f"{where}: give min_tokens, max_tokens or both")
    low = _count(opts["min_tokens"], f"{where}.min_tokens", 0) if "min_tokens" in opts else None
    high = _count(opts["max_tokens"], f"{where}.max_tokens", 1) if "max_tokens" in opts else None
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{where}: min_tokens {low} > max_tokens {high}")

    def reject_reason(s: dict) -> str | None:
        n = s["token_count"]
        if low is not None and n < low:
            return f"{n} tokens < min_tokens {low}"
        if high is not None and n > high:
            return f"{n} tokens > max_tokens {high}"
        return None

    return _per_sample("length", reject_reason)


def _dedup() -> Filter:
    def apply(samples: list[dict]) -> tuple[Kept, Dropped]:
        seen: set[tuple[Any, str]] = set()
        kept, dropped = [], []
        for s in samples:
            key = (s["prompt_id"], normalize(s["text"]))
            if key in seen:
                dropped.append((s, "same normalised text as an earlier sample of this prompt"))
            else:
                seen.add(key)
                kept.append(s)
        return kept, dropped

    return Filter("dedup", apply)


def _max_per_prompt(options: Any, where: str) -> Filter:
    k = _count(options, where, 1)

    def apply(samples: list[dict]) -> tuple[Kept, Dropped]:
        counts: dict[Any, int] = {}
        kept, dropped = [], []
        for s in samples:
            pid = s["prompt_id"]
            if counts.get(pid, 0) >= k:
                dropped.append((s, f"prompt already has {k} kept samples"))
            else:
                counts[pid] = counts.get(pid, 0) + 1
                kept.append(s)
        return kept, dropped

    return Filter("max_per_prompt", apply)


def _best_k(options: Any, where: str, base_dir: Path) -> Filter:
    opts = _options(options, where, {"k", "scorer"}, {"k", "scorer"})
    k = _count(opts["k"], f"{where}.k", 1)
    fn = _load_function(opts["scorer"], f"{where}.scorer", base_dir, "(sample, text) -> float")

    def score(s: dict) -> float:
        value = fn(s, s["text"])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{where}.scorer {opts['scorer']}: returned {value!r} for prompt_id "
                             f"{s['prompt_id']!r}, expected a number")
        return float(value)

    def apply(samples: list[dict]) -> tuple[Kept, Dropped]:
        by_prompt: dict[Any, list[int]] = {}
        for i, s in enumerate(samples):
            by_prompt.setdefault(s["prompt_id"], []).append(i)
        best: set[int] = set()
        for indices in by_prompt.values():
            # Highest score first; equal scores keep the earlier sample.
            best.update(sorted(indices, key=lambda i: -samples[i]["score"])[:k])
        kept = [s for i, s in enumerate(samples) if i in best]
        dropped = [(s, f"score {s['score']:g} not among the best {k} of this prompt")
                   for i, s in enumerate(samples) if i not in best]
        return kept, dropped

    return Filter("best_k", apply, scorer=score)


def _band(options: Any, where: str) -> Filter:
    max_solved = None  # left out: only prompts every sample solved
    if options is not None:
        value = _options(options, where, {"max_solved"}, set()).get("max_solved")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"{where}.max_solved: expected a fraction in (0, 1), got {value!r} (prompts solved "
                                  "by more than it are removed; leave it out to remove only those every sample solved)")
            max_solved = float(value)

    def apply(samples: list[dict], input_counts: dict[Any, int]) -> tuple[Kept, Dropped]:
        solved = Counter(s["prompt_id"] for s in samples)
        reasons = {}
        for pid, c in solved.items():
            n = input_counts[pid]
            if c == n:
                reasons[pid] = "prompt solved by its only sample" if n == 1 else f"prompt solved by all {n} samples"
            elif max_solved is not None and c / n > max_solved:
                reasons[pid] = f"prompt solved by {c} of {n} samples (above max_solved {max_solved:g})"
        return ([s for s in samples if s["prompt_id"] not in reasons],
                [(s, reasons[s["prompt_id"]]) for s in samples if s["prompt_id"] in reasons])

    return Filter("band", apply, counts_input=True)


def _load_function(dotted: Any, where: str, base_dir: Path, contract: str) -> Callable:
    """The function `dotted` names (`package.module:function` or `package.module.function`),
    checked to take two arguments."""
    if not isinstance(dotted, str):
        raise ConfigError(f"{where}: expected 'package.module:function', got {dotted!r}")
    try:
        fn = resolve_function(dotted, base_dir)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: cannot import {dotted!r}: {e}") from None
    except AttributeError as e:
        raise ConfigError(f"{where}: {dotted!r} not found: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {dotted!r}: expected 'package.module:function' ({e})") from None
    except Exception as e:  # the module's own code failed while importing
        raise ConfigError(f"{where}: importing {dotted!r} failed: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{where}: {dotted!r} is not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature to check
        return fn
    try:
        signature.bind(None, None)
    except TypeError:
        raise ConfigError(f"{where}: {dotted!r} must be {contract}; its signature is {signature}") from None
    return fn


# Filters built from their options (the two that import a function are added per base_dir).
_BUILDERS: dict[str, Callable[[Any, str], Filter]] = {
    "answer_regex": _answer_regex,
    "length": _length,
    "max_per_prompt": _max_per_prompt,
}
_WITHOUT_OPTIONS: dict[str, Callable[[], Filter]] = {"dedup": _dedup}
# Written alone (`- band`) or with options (`- band: {max_solved: 0.75}`).
_OPTIONAL_OPTIONS: dict[str, Callable[[Any, str], Filter]] = {"band": _band}
