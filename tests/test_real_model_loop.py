"""One round of the generate → filter → train loop from the real pretrained model itself
(`loop.start_model: base`, no SFT first), end to end through Dagster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.real_model import BASE
from trainer.core.config import experiment_from_dict

pytestmark = pytest.mark.slow


def test_a_round_from_the_pretrained_model(real_model_store, smollm2_converted, tmp_path, instance):
    from assets.loop import round_asset_key
    from assets.models import base_model_asset_key
    from assets.training import merged_asset_key
    from pipelines.cli import run_loop
    from trainer.data.default_data import verify
    from trainer.loop.rounds import ACCEPTED_ROWS

    exp = experiment_from_dict({
        "name": "smol_loop", "store": str(real_model_store),
        "data": {"name": "smol_few_shot", "source": {"builtin": "few_shot", "rows": 8},
                 "eval": {"source": {"builtin": "few_shot", "split": "test", "rows": 6}}, "max_length": 256,
                 "checks": {"min_packing_efficiency": 0.0, "max_reject_rate": 1.0}},
        "model": {"base": BASE},
        "training": {"max_steps": 2, "per_device_train_batch_size": 1, "learning_rate": 1e-3, "save_strategy": "no",
                     "logging_steps": 1, "accuracy_rows": 6, "sample_generations": 0, "max_new_tokens": 8},
        "loop": {"start_model": "base",
                 "prompts": {"source": {"builtin": "few_shot", "split": "train", "rows": 12}},
                 "generation": {"samples_per_prompt": 4, "temperature": 0.7, "max_new_tokens": 8, "seed": 0},
                 "filters": [{"verifier": "trainer.data.default_data:verify"}, "dedup"],
                 "stop": {"max_rounds": 1}},
    }, base_dir=tmp_path)

    result = run_loop(exp, 1, instance)
    (round0,) = result["rounds"]
    assert result["stopped_because"] == "max_rounds 1 reached"
    assert round0["samples"] == 12 * 4 and 0 < round0["accepted"] <= round0["samples"]
    assert 0.0 <= round0["start_pass1"] <= 1.0 and 0.0 <= round0["heldout_pass1"] <= 1.0

    # Round 0 sampled the pretrained model itself: the conversion (a cache hit here), no SFT.
    samples = instance.get_latest_materialization_event(round_asset_key(exp, "round_samples")).asset_materialization
    assert samples.metadata["generator"].value == str(smollm2_converted.path)
    base = instance.get_latest_materialization_event(base_model_asset_key(exp)).asset_materialization
    assert base.metadata["cache_hit"].value is True and base.metadata["path"].value == str(smollm2_converted.path)
    assert instance.get_latest_materialization_event(merged_asset_key(exp)) is None

    # What the round trained on: only answers the task's verifier accepts, none twice.
    accepted = instance.get_latest_materialization_event(round_asset_key(exp, "round_accepted")).asset_materialization
    with open(Path(accepted.metadata["path"].value) / ACCEPTED_ROWS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == round0["accepted"]
    for row in rows:
        asked, answer = row["messages"][:-1], row["messages"][-1]
        assert answer["role"] == "assistant" and verify({"prompt": asked}, answer["content"])
    assert len({json.dumps(r["messages"]) for r in rows}) == len(rows)

    # The round's adapter was trained on the pretrained model's directory; its merged model is tied.
    adapter = instance.get_latest_materialization_event(round_asset_key(exp, "round_adapter")).asset_materialization
    config = json.loads((Path(adapter.metadata["path"].value) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_converted.path)
    evaluated = instance.get_latest_materialization_event(round_asset_key(exp, "round_eval")).asset_materialization
    merged = json.loads((Path(evaluated.metadata["path"].value) / "config.json").read_text())
    assert merged["tie_word_embeddings"] is True
