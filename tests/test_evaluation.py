"""Evaluation and promotion as assets, through a real Dagster instance, real training processes and a
real MLflow registry: a changed scorer rescores without retraining; the alias moves only to a better
model; a scorer that errs on every row fails in one line and promotes nothing."""

import dataclasses
import json

import pytest

from assets.evaluation import champion_asset_key, evaluation_asset_key
from assets.store_io import latest_metadata
from assets.training import adapter_asset_key, merged_asset_key
from pipelines.cli import materialize_experiment
from trainer.training.tracking import resolve_tracking

from .conftest import small_rows
from .test_training_assets import TINY_MODEL, TINY_TRAINING

CHECKS = '''
def right(sample, text):
    return text.strip() == str(sample["reference"]).strip()


def broken(sample, text):
    raise KeyError("answer")
'''


def _experiment(make_experiment, tmp_path, training=None, **top):
    (tmp_path / "checks.py").write_text(CHECKS)
    return make_experiment(name="judged", rows=small_rows(40),
                           data={"name": "judged_data", "eval": {"fraction": 0.2},
                                 "checks": {"min_packing_efficiency": 0.5}},
                           model=TINY_MODEL, training={**TINY_TRAINING, "max_steps": 2, **(training or {})}, **top)


def _values(meta: dict) -> dict:
    return {k: v.value for k, v in meta.items()}


@pytest.mark.slow
def test_evaluation_rescoring_and_promotion_only_when_better(make_experiment, instance, tmp_path):
    from mlflow import MlflowClient

    exp = _experiment(make_experiment, tmp_path, eval={"promote": {"metric": "held_out_loss"}},
                      training={"keep_checkpoints": True, "save_steps": 1, "save_total_limit": None})
    assert materialize_experiment(exp, "model", instance=instance).success
    first = _values(latest_metadata(instance, evaluation_asset_key(exp)))
    # each kept checkpoint scored too: a row per step, the trained model last; MLflow's curve by step
    steps = [line.split("|")[1].strip() for line in first["checkpoints"].splitlines()[2:]]
    assert steps == ["1", "2", "2"]
    assert first["checkpoints"].splitlines()[-1] == first["checkpoints"].splitlines()[-2]  # step 2 is the model
    # before and after, each by the scorer and by the held-out loss; the answers shown
    assert first["headline_scorer"] == "exact" and first["scored_rows"] == TINY_TRAINING["accuracy_rows"]
    assert 0 <= first["accuracy_merged"] <= 1 and 0 <= first["accuracy_base"] <= 1
    assert first["held_out_loss"] > 0 and first["held_out_loss_base"] > 0
    assert first["held_out_loss"] != first["held_out_loss_base"]  # the trained model is another model
    assert first["held_out_answers"].count("\n") == TINY_TRAINING["accuracy_rows"] + 1
    run_id = latest_metadata(instance, adapter_asset_key(exp))["mlflow_run_id"].value
    client = MlflowClient(tracking_uri=resolve_tracking(exp)[0])
    assert [m.step for m in client.get_metric_history(run_id, "checkpoint/held_out_loss")] == [1, 2]
    champion = _values(latest_metadata(instance, champion_asset_key(exp)))
    assert champion["promoted"] is True and champion["champion_version"] == "1"
    assert "no champion" in champion["why"]

    # A second scorer: scored again, neither trained nor merged again; the same model stays champion.
    rescored = dataclasses.replace(exp, eval=dataclasses.replace(
        exp.eval, scorers=["exact", {"verifier": "checks:right"}]))
    assert materialize_experiment(rescored, "model", instance=instance).success
    assert latest_metadata(instance, adapter_asset_key(exp))["cache_hit"].value is True
    assert latest_metadata(instance, merged_asset_key(exp))["cache_hit"].value is True
    second = _values(latest_metadata(instance, evaluation_asset_key(exp)))
    assert second["score_version"] != first["score_version"]
    assert second["verifier"] == second["exact"] == first["exact"]  # the verifier checks what exact match does
    assert _values(latest_metadata(instance, champion_asset_key(exp)))["champion_version"] == "1"

    # Trained otherwise: a new version, promoted exactly when its held-out loss is lower.
    losses = {1: first["held_out_loss"]}
    for lr in (0.05, 0.0005):
        other = dataclasses.replace(rescored, training=dataclasses.replace(exp.training, learning_rate=lr))
        assert materialize_experiment(other, "model", instance=instance).success
        scores = _values(latest_metadata(instance, evaluation_asset_key(exp)))
        decision = _values(latest_metadata(instance, champion_asset_key(exp)))
        version = int(decision["candidate_version"])
        losses[version] = scores["held_out_loss"]
        best = min(losses, key=lambda v: (losses[v], v))
        assert decision["promoted"] is (best == version), decision["why"]
        assert decision["champion_version"] == str(best)
        assert int(client.get_model_version_by_alias("judged", "champion").version) == best
    assert len(losses) == 3


@pytest.mark.slow
def test_a_scorer_erring_on_every_row_fails_in_one_line_and_promotes_nothing(make_experiment, instance, tmp_path):
    exp = _experiment(make_experiment, tmp_path, eval={"scorers": [{"verifier": "checks:broken"}]})
    with pytest.raises(SystemExit) as failed:
        materialize_experiment(exp, "model", instance=instance)
    assert str(failed.value) == ("sftdag: scoring failed: eval.scorers[0].verifier 'checks:broken': row 0: "
                                 "KeyError: 'answer'")
    assert latest_metadata(instance, adapter_asset_key(exp))  # trained and merged, then not scored …
    assert latest_metadata(instance, evaluation_asset_key(exp)) == {}
    assert latest_metadata(instance, champion_asset_key(exp)) == {}  # … and nothing promoted
