"""The experiment YAML's `loop:` section: generate → filter → train rounds, and when they stop.

```yaml
loop:
  prompts:
    source: {builtin: default}    # like data.source: exactly one of builtin / path / hub
    fields:
      prompt: prompt              # a prompt string …
      messages: messages          # … or a messages list (a trailing assistant turn is not asked)
      reference: answer           # the reference answer; null: none (check with a verifier)
  generation:
    samples_per_prompt: 4
    temperature: 0.8              # 0: greedy (then samples_per_prompt must be 1)
    top_p: 1.0
    max_new_tokens: 64
    seed: 0
  filters: []                     # see trainer/loop/filters.py
  drop_truncated: true            # drop samples that stopped at max_new_tokens
  start_model: null               # default: the experiment's merged SFT model; base: model.base
                                  # itself (ReST-EM: no SFT first); or a model directory
  training:
    adapter: fresh                # fresh: a new adapter on the starting model each round
                                  # (STaR, ReST-EM) | continue: the previous round's adapter
    data: round                   # round: this round's accepted samples | all_rounds
    replay: 0.0                   # the fraction of a round's training rows drawn from the SFT
                                  # training data (so the round keeps what SFT taught), in [0, 1)
    learning_rate: null           # these five: a round's own settings (null: the experiment's)
    num_train_epochs: null
    max_steps: null
    warmup_steps: null
    modules_to_save: null         # training.lora.modules_to_save for rounds; []: LoRA only (a round
                                  # trained on one task then leaves the embeddings and head alone)
  stop:
    max_rounds: 3                 # null: no limit (then patience or min_acceptance is required)
    patience: null                # stop after this many rounds without held-out improvement
    min_acceptance: null          # stop when a round's acceptance rate falls below this
  schedule: {cron: null, timezone: UTC, running: false}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from trainer.core.config import ConfigError, ScheduleConfig, SourceConfig, _build
from trainer.loop.filters import build_pipeline

# The keys of a round's entry in the history `should_stop` reads.
ACCEPTANCE = "acceptance_rate"
HELD_OUT = "held_out"  # the round's held-out score, higher is better
# loop.start_model: base — start from the experiment's pretrained model.base itself (ReST-EM).
START_FROM_BASE = "base"


@dataclass(frozen=True)
class PromptFields:
    prompt: str = "prompt"
    messages: str = "messages"
    reference: Optional[str] = "answer"


@dataclass(frozen=True)
class PromptsConfig:
    source: SourceConfig = field(default_factory=lambda: SourceConfig(builtin="default"))
    fields: PromptFields = field(default_factory=PromptFields)


@dataclass(frozen=True)
class GenerationConfig:
    samples_per_prompt: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


@dataclass(frozen=True)
class RoundTrainingConfig:
    adapter: Literal["fresh", "continue"] = "fresh"
    data: Literal["round", "all_rounds"] = "round"
    # The fraction of a round's training rows that are rows of the experiment's SFT training data.
    replay: float = 0.0
    # A round's training settings where they differ from the experiment's `training:` (chosen
    # for the SFT run): None keeps the experiment's.
    learning_rate: Optional[float] = None
    num_train_epochs: Optional[float] = None
    max_steps: Optional[int] = None
    warmup_steps: Optional[int] = None
    modules_to_save: Optional[list[str]] = None


@dataclass(frozen=True)
class StopConfig:
    max_rounds: Optional[int] = 3
    patience: Optional[int] = None
    min_acceptance: Optional[float] = None


@dataclass(frozen=True)
class LoopConfig:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Filter entries as written in the YAML (plain data, so the config hashes and serializes);
    # `build_pipeline(cfg.filters, ...)` builds them.
    filters: list[Any] = field(default_factory=list)
    drop_truncated: bool = True
    # A local model directory or a hub id; "base": the experiment's model.base itself (a GGUF
    # base: its converted directory); None: the experiment's merged SFT model.
    start_model: Optional[str] = None
    training: RoundTrainingConfig = field(default_factory=RoundTrainingConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def parse_loop(raw: dict, base_dir: Path) -> LoopConfig:
    """`loop:` → LoopConfig. Errors are ConfigError naming the key (`loop.stop.patience: …`);
    the filters are built once here (`base_dir`: the YAML's folder, where a verifier's or
    scorer's file may be), so a bad regex or dotted path fails when the YAML is read."""
    cfg = _build(LoopConfig, raw, "loop")
    cfg.prompts.source.validate("loop.prompts.source")
    g = cfg.generation
    if g.samples_per_prompt < 1:
        raise ConfigError("loop.generation.samples_per_prompt: must be at least 1")
    if g.temperature < 0:
        raise ConfigError("loop.generation.temperature: must be >= 0")
    if g.temperature == 0 and g.samples_per_prompt > 1:
        raise ConfigError("loop.generation.temperature: 0 (greedy) repeats one sample; "
                          "set samples_per_prompt to 1 or sample with temperature > 0")
    if not 0 < g.top_p <= 1:
        raise ConfigError("loop.generation.top_p: must be in (0, 1]")
    if g.max_new_tokens < 1:
        raise ConfigError("loop.generation.max_new_tokens: must be at least 1")
    build_pipeline(cfg.filters, drop_truncated=cfg.drop_truncated, base_dir=base_dir)
    if cfg.prompts.fields.reference is None:
        for i, spec in enumerate(cfg.filters):
            if isinstance(spec, dict) and "answer_regex" in spec:
                raise ConfigError(f"loop.filters[{i}].answer_regex: checks against a reference, "
                                  "but loop.prompts.fields.reference is null")
    if not 0 <= cfg.training.replay < 1:
        raise ConfigError(f"loop.training.replay: must be in [0, 1) (the fraction of a round's training rows "
                          f"replayed from the SFT data), got {cfg.training.replay!r}")
    s = cfg.stop
    if s.max_rounds is not None and s.max_rounds < 1:
        raise ConfigError("loop.stop.max_rounds: must be at least 1")
    if s.patience is not None and s.patience < 1:
        raise ConfigError("loop.stop.patience: must be at least 1")
    if s.min_acceptance is not None and not 0 < s.min_acceptance <= 1:
        raise ConfigError("loop.stop.min_acceptance: must be in (0, 1]")
    if s.max_rounds is None and s.patience is None and s.min_acceptance is None:
        raise ConfigError("loop.stop: give at least one of max_rounds, patience, min_acceptance "
                          "(the loop would never stop)")
    return cfg


def should_stop(history: list[dict], cfg: LoopConfig) -> str | None:
    """Why the loop stops after the rounds in `history` (oldest first; each round's
    `acceptance_rate` and `held_out` score), or None to run another round."""
    s = cfg.stop
    if s.max_rounds is not None and len(history) >= s.max_rounds:
        return f"max_rounds {s.max_rounds} reached"
    if s.min_acceptance is not None and history:
        rate = _value(history, -1, ACCEPTANCE, "loop.stop.min_acceptance")
        if rate < s.min_acceptance:
            return f"acceptance {rate:g} below floor {s.min_acceptance:g}"
    if s.patience is not None and len(history) > s.patience:
        scores = [_value(history, i, HELD_OUT, "loop.stop.patience") for i in range(len(history))]
        if max(scores[-s.patience:]) <= max(scores[:-s.patience]):
            return f"no held-out improvement for {s.patience} rounds"
    return None


def _value(history: list[dict], i: int, key: str, rule: str) -> float:
    value = history[i].get(key)
    if value is None:
        raise ValueError(f"history[{i % len(history)}]: no {key!r} (needed by {rule})")
    return value


def loop_config(exp) -> LoopConfig:
    """The parsed `loop:` section of an Experiment (ConfigError naming the key when it is wrong,
    or when the experiment has none)."""
    if exp.loop is None:
        raise ConfigError(f"experiment {exp.name}: no `loop:` section")
    return parse_loop(exp.loop, Path(exp.base_dir))
