"""The `loop:` section of the experiment YAML, and when the loop stops."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from trainer.core.config import ConfigError
from trainer.loop.settings import LoopConfig, parse_loop, should_stop

FULL = """
prompts:
  source: {path: prompts/*.jsonl}
  fields: {prompt: question, reference: final}
generation: {samples_per_prompt: 8, temperature: 1, top_p: 0.95, max_new_tokens: 256, seed: 3}
filters:
  - answer_regex: {pattern: "#### (-?\\\\d+)"}
  - dedup
  - max_per_prompt: 2
drop_truncated: false
start_model: models/sft
training: {adapter: continue, data: all_rounds}
stop: {max_rounds: null, patience: 2, min_acceptance: 0.05}
schedule: {cron: "0 3 * * *"}
"""


def test_defaults(tmp_path):
    cfg = parse_loop({}, tmp_path)
    assert cfg == LoopConfig()
    assert cfg.prompts.source.builtin == "default"
    assert (cfg.prompts.fields.prompt, cfg.prompts.fields.messages, cfg.prompts.fields.reference) == (
        "prompt", "messages", "answer")
    g = cfg.generation
    assert (g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens, g.seed) == (4, 0.8, 1.0, 64, 0)
    assert cfg.filters == [] and cfg.drop_truncated is True and cfg.start_model is None
    assert (cfg.training.adapter, cfg.training.data) == ("fresh", "round")
    assert (cfg.stop.max_rounds, cfg.stop.patience, cfg.stop.min_acceptance) == (3, None, None)
    assert cfg.schedule.cron is None


def test_full_section(tmp_path):
    cfg = parse_loop(yaml.safe_load(FULL), tmp_path)
    assert cfg.prompts.source.path == "prompts/*.jsonl"
    assert (cfg.prompts.fields.prompt, cfg.prompts.fields.reference) == ("question", "final")
    assert cfg.generation.temperature == 1.0 and isinstance(cfg.generation.temperature, float)
    assert cfg.filters[0] == {"answer_regex": {"pattern": "#### (-?\\d+)"}}
    assert cfg.drop_truncated is False and cfg.start_model == "models/sft"
    assert (cfg.training.adapter, cfg.training.data) == ("continue", "all_rounds")
    assert cfg.stop.patience == 2 and cfg.schedule.cron == "0 3 * * *"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.drop_truncated = True


def test_round_trips_through_json(tmp_path):
    """A run spec carries the config as JSON; reading it back gives the same config."""
    cfg = parse_loop(yaml.safe_load(FULL), tmp_path)
    assert parse_loop(json.loads(json.dumps(dataclasses.asdict(cfg))), tmp_path) == cfg


@pytest.mark.parametrize("raw, message", [
    ({"generaton": {}}, r"^loop: unknown key\(s\) \['generaton'\]"),
    ({"generation": {"temprature": 1.0}}, r"^loop\.generation: unknown key\(s\) \['temprature'\]"),
    ({"generation": {"samples_per_prompt": "4"}}, r"^loop\.generation\.samples_per_prompt: expected int"),
    ({"generation": {"samples_per_prompt": 0}}, r"^loop\.generation\.samples_per_prompt: must be at least 1"),
    ({"generation": {"temperature": -0.1}}, r"^loop\.generation\.temperature: must be >= 0"),
    ({"generation": {"temperature": 0}}, r"^loop\.generation\.temperature: 0 \(greedy\) repeats one sample"),
    ({"generation": {"top_p": 0}}, r"^loop\.generation\.top_p: must be in \(0, 1\]"),
    ({"generation": {"max_new_tokens": 0}}, r"^loop\.generation\.max_new_tokens: must be at least 1"),
    ({"prompts": {"source": {"builtin": "default", "path": "x.jsonl"}}},
     r"^loop\.prompts\.source: give exactly one of builtin, path, hub"),
    ({"prompts": {"fields": {"answer": "x"}}}, r"^loop\.prompts\.fields: unknown key\(s\) \['answer'\]"),
    ({"training": {"adapter": "reuse"}}, r"^loop\.training\.adapter: 'reuse' is not one of \['fresh', 'continue'\]"),
    ({"training": {"data": "all"}}, r"^loop\.training\.data: 'all' is not one of \['round', 'all_rounds'\]"),
    ({"drop_truncated": "yes"}, r"^loop\.drop_truncated: expected bool"),
    ({"filters": [{"max_per_prompt": 1}, {"verifier": "trainer.data.default_data:solve_it"}]},
     r"^loop\.filters\[1\]\.verifier: 'trainer\.data\.default_data:solve_it' not found"),
    ({"prompts": {"fields": {"reference": None}}, "filters": ["dedup", {"answer_regex": {"pattern": "(\\d+)"}}]},
     r"^loop\.filters\[1\]\.answer_regex: checks against a reference, but loop\.prompts\.fields\.reference is null"),
    ({"stop": {"max_rounds": 0}}, r"^loop\.stop\.max_rounds: must be at least 1"),
    ({"stop": {"patience": 0}}, r"^loop\.stop\.patience: must be at least 1"),
    ({"stop": {"min_acceptance": 1.5}}, r"^loop\.stop\.min_acceptance: must be in \(0, 1\]"),
    ({"stop": {"max_rounds": None}}, r"^loop\.stop: give at least one of max_rounds, patience, min_acceptance"),
    ({"schedule": {"cron": 3}}, r"^loop\.schedule\.cron: .*expected str"),
])
def test_errors_name_their_key(raw, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_loop(raw, tmp_path)


def test_greedy_with_one_sample_is_allowed(tmp_path):
    assert parse_loop({"generation": {"temperature": 0, "samples_per_prompt": 1}}, tmp_path).generation.temperature == 0


def _stop(tmp_path, **stop) -> LoopConfig:
    return parse_loop({"stop": {"max_rounds": None, **stop}}, tmp_path)


def rounds(*held_out, acceptance=0.5):
    return [{"acceptance_rate": acceptance, "held_out": h} for h in held_out]


def test_max_rounds(tmp_path):
    cfg = parse_loop({"stop": {"max_rounds": 3}}, tmp_path)
    assert should_stop([], cfg) is None
    assert should_stop(rounds(0.1, 0.2), cfg) is None
    assert should_stop(rounds(0.1, 0.2, 0.3), cfg) == "max_rounds 3 reached"


def test_patience(tmp_path):
    cfg = _stop(tmp_path, patience=2)
    assert should_stop(rounds(0.5), cfg) is None
    assert should_stop(rounds(0.5, 0.4), cfg) is None                     # one round without improvement
    assert should_stop(rounds(0.5, 0.4, 0.5), cfg) == "no held-out improvement for 2 rounds"  # equal is none
    assert should_stop(rounds(0.5, 0.4, 0.6), cfg) is None                # the last round improved
    assert should_stop(rounds(0.1, 0.5, 0.6, 0.55, 0.58), cfg) == "no held-out improvement for 2 rounds"


def test_acceptance_floor(tmp_path):
    cfg = _stop(tmp_path, min_acceptance=0.05)
    assert should_stop(rounds(0.5, acceptance=0.05), cfg) is None
    assert should_stop(rounds(0.5, 0.5, acceptance=0.01), cfg) == "acceptance 0.01 below floor 0.05"
    # Only the latest round counts.
    assert should_stop(rounds(0.5, acceptance=0.01) + rounds(0.5, acceptance=0.2), cfg) is None


def test_a_round_without_the_score_a_rule_needs_is_named(tmp_path):
    cfg = _stop(tmp_path, patience=1)
    with pytest.raises(ValueError, match=r"history\[1\]: no 'held_out' \(needed by loop\.stop\.patience\)"):
        should_stop([{"held_out": 0.3}, {"acceptance_rate": 0.4}], cfg)


def test_a_round_trains_with_its_own_settings(make_experiment, tmp_path):
    """`loop.training` overrides the experiment's training settings for the rounds only; an empty
    modules_to_save trains LoRA alone (the SFT's whole embeddings and head stay as they are)."""
    from types import SimpleNamespace

    from trainer.loop.rounds import ACCEPTED_ROWS, round_experiment
    from trainer.loop.settings import loop_config

    training = {"learning_rate": 0.002, "warmup_steps": 50, "num_train_epochs": 2,
                "lora": {"r": 4, "modules_to_save": ["embed_tokens", "lm_head"]}}
    loop = {"prompts": {"source": {"builtin": "default", "rows": 6}}, "stop": {"max_rounds": 1},
            "training": {"learning_rate": 0.0005, "warmup_steps": 5, "modules_to_save": []}}
    exp = make_experiment(training=training, loop=loop)
    accepted = SimpleNamespace(path=tmp_path / "accepted")
    round_exp = round_experiment(exp, loop_config(exp), 0, accepted, tmp_path / "start", None)
    t = round_exp.training
    assert (t.learning_rate, t.warmup_steps, t.num_train_epochs) == (0.0005, 5, 2)
    assert t.lora.modules_to_save is None and t.lora.r == 4
    assert round_exp.data.source.path == str(tmp_path / "accepted" / ACCEPTED_ROWS)
    assert exp.training.lora.modules_to_save == ["embed_tokens", "lm_head"]  # the SFT keeps its own
    unchanged = make_experiment(training=training, loop={**loop, "training": {}})
    assert round_experiment(unchanged, loop_config(unchanged), 0, accepted, tmp_path / "start", None).training.lora \
        .modules_to_save == ["embed_tokens", "lm_head"]
