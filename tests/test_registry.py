"""Model registry: versions of merged models in a real MLflow sqlite store, and the champion alias
that moves only to a strictly better model."""

from __future__ import annotations

import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from trainer.training.registry import champion, promote, register, version_info
from trainer.training.tracking import resolve_tracking

BASIS = "heldout-aaaa"
NAME = "sft-model"


@pytest.fixture
def uri(make_experiment):
    """The project's default tracking URI (sqlite under the store root) holds the registry."""
    return resolve_tracking(make_experiment())[0]


@pytest.fixture
def model_dir(tmp_path):
    """model_dir(key) → a real folder standing for a merged model in the store."""

    def make(key: str) -> Path:
        folder = tmp_path / "store" / "merged" / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"\0" * 64)
        return folder

    return make


def lineage(key: str, **scores: float) -> dict[str, str]:
    return {"merged_key": key, "adapter_key": f"ad-{key}", "data_version": "dv-1",
            **{f"score.{s}": str(v) for s, v in scores.items()}}


def add(uri, model_dir, key, value, *, metric="verifier", basis=BASIS, higher_is_better=True, **kw):
    """Register a model and try to promote it, as the pipeline does after evaluating it."""
    info = register(uri, NAME, model_dir(key), metric=metric, value=value, basis=basis, lineage=lineage(key))
    return info, promote(uri, NAME, info.version, metric=metric, value=value, basis=basis,
                         higher_is_better=higher_is_better, **kw)


def test_first_version_becomes_champion_and_carries_its_lineage(uri, model_dir):
    folder = model_dir("m1")
    info = register(uri, NAME, folder, metric="verifier", value=0.41, basis=BASIS,
                    lineage=lineage("m1", verifier=0.41, exact_match=0.2))
    assert info.version == 1
    # The version points at the folder in the store; nothing is copied.
    assert info.source == folder.resolve().as_uri()
    assert champion(uri, NAME) is None

    result = promote(uri, NAME, 1, metric="verifier", value=0.41, basis=BASIS)
    assert result.promoted and result.champion_version == 1 and result.previous_version is None
    assert result.reason == "no champion yet: version 1 (verifier 0.41) becomes champion"

    held = champion(uri, NAME)
    assert held.version == 1 and held.source == folder.resolve().as_uri()
    assert (held.metric, held.value, held.basis) == ("verifier", 0.41, BASIS)
    assert held.lineage == {"merged_key": "m1", "adapter_key": "ad-m1", "data_version": "dv-1",
                            "score.verifier": "0.41", "score.exact_match": "0.2"}
    assert held.aliases == ("champion",)
    # The decision is visible in the MLflow UI as tags of the version.
    assert held.tags["sftdag.promotion"] == f"promoted: {result.reason}"
    assert held.tags["sftdag.merged_key"] == "m1"


def test_better_moves_the_alias_worse_or_equal_keeps_it(uri, model_dir):
    add(uri, model_dir, "m1", 0.34)
    _, better = add(uri, model_dir, "m2", 0.41)
    assert better.promoted and better.champion_version == 2
    assert (better.previous_version, better.previous_value, better.value) == (1, 0.34, 0.41)
    assert better.reason == "version 2 (verifier 0.41) beats champion version 1 (0.34) by 0.07"

    for key, value in (("m3", 0.30), ("m4", 0.41)):
        info, kept = add(uri, model_dir, key, value)
        assert not kept.promoted and kept.champion_version == 2 and kept.previous_version == 2
        assert kept.reason == (f"kept champion version 2: version {info.version}'s verifier {value:.4g} "
                               f"is not better than 0.41")
        assert champion(uri, NAME).version == 2
        from mlflow import MlflowClient

        tags = MlflowClient(uri).get_model_version(NAME, str(info.version)).tags
        assert tags["sftdag.promotion"] == f"not promoted: {kept.reason}"


def test_min_delta_requires_a_margin(uri, model_dir):
    add(uri, model_dir, "m1", 0.50)
    _, small = add(uri, model_dir, "m2", 0.52, min_delta=0.05)
    assert not small.promoted and small.champion_version == 1
    assert small.reason == ("kept champion version 1 (0.5): version 2's verifier 0.52 is better by only 0.02, "
                            "not more than min_delta 0.05")
    _, big = add(uri, model_dir, "m3", 0.60, min_delta=0.05)
    assert big.promoted and big.champion_version == 3
    with pytest.raises(ValueError, match="min_delta"):
        promote(uri, NAME, 3, metric="verifier", value=0.7, basis=BASIS, min_delta=-1)


def test_lower_is_better_for_a_loss(uri, model_dir):
    add(uri, model_dir, "m1", 2.0, metric="eval_loss", higher_is_better=False)
    _, worse = add(uri, model_dir, "m2", 2.5, metric="eval_loss", higher_is_better=False)
    assert not worse.promoted and worse.champion_version == 1
    assert worse.reason == ("kept champion version 1: version 2's eval_loss 2.5 is not better than 2 "
                            "(lower is better)")
    _, better = add(uri, model_dir, "m3", 1.5, metric="eval_loss", higher_is_better=False)
    assert better.promoted and better.champion_version == 3
    assert better.reason == "version 3 (eval_loss 1.5) beats champion version 1 (2) by 0.5 (lower is better)"


def test_registering_the_same_merged_model_twice_gives_one_version(uri, model_dir):
    from mlflow import MlflowClient

    first = register(uri, NAME, model_dir("m1"), metric="verifier", value=0.4, basis=BASIS, lineage=lineage("m1"))
    again = register(uri, NAME, model_dir("m1"), metric="verifier", value=0.4, basis=BASIS, lineage=lineage("m1"))
    other = register(uri, NAME, model_dir("m2"), metric="verifier", value=0.4, basis=BASIS, lineage=lineage("m2"))
    assert first.version == again.version == 1 and other.version == 2
    assert len(MlflowClient(uri).search_model_versions(f"name='{NAME}'")) == 2


def test_registration_links_the_training_run(uri, model_dir):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("reg")).info.run_id
    info = register(uri, NAME, model_dir("m1"), metric="verifier", value=None, basis=BASIS,
                    lineage=lineage("m1"), run_id=run_id)
    assert info.run_id == run_id and info.value is None
    assert client.get_model_version(NAME, "1").run_id == run_id


def test_basis_mismatch_rescores_the_champion(uri, model_dir):
    add(uri, model_dir, "m1", 0.80, basis="old-prompts")
    # Not comparable and no way to rescore: nothing moves.
    _, blind = add(uri, model_dir, "m2", 0.50, basis="new-prompts")
    assert not blind.promoted and blind.champion_version == 1 and blind.previous_value is None
    assert blind.reason == ("kept champion version 1: its verifier was measured on basis old-prompts, "
                            "version 2's (0.5) on basis new-prompts, and no rescore was given")
    # A rescore that finds no value: nothing moves either.
    _, empty = add(uri, model_dir, "m3", 0.50, basis="new-prompts", rescore=lambda holder: None)
    assert not empty.promoted and "rescoring it on basis new-prompts gave no value" in empty.reason
    assert "version 1" in empty.reason and "version 3" in empty.reason and "0.5" in empty.reason

    seen = []

    def rescore(holder):
        seen.append((holder.version, holder.basis, holder.source))
        return 0.45

    _, rescored = add(uri, model_dir, "m4", 0.50, basis="new-prompts", rescore=rescore)
    assert seen == [(1, "old-prompts", model_dir("m1").resolve().as_uri())]
    assert rescored.promoted and rescored.champion_version == 4 and rescored.previous_value == 0.45
    assert rescored.reason == ("version 4 (verifier 0.5) beats champion version 1 "
                               "(0.45 rescored on basis new-prompts) by 0.05")
    # The rescored value is kept on the old champion under the new basis, beside its original one.
    old = version_info(uri, NAME, 1)
    assert old.value_on("verifier", "old-prompts") == 0.80 and old.value_on("verifier", "new-prompts") == 0.45


def test_recorded_rescore_is_reused(uri, model_dir):
    add(uri, model_dir, "m1", 0.80, basis="old-prompts")
    _, first = add(uri, model_dir, "m2", 0.30, basis="new-prompts", rescore=lambda holder: 0.40)
    assert not first.promoted and first.previous_value == 0.40

    def must_not_rescore(holder):
        raise AssertionError("the champion's value on this basis is already recorded")

    _, second = add(uri, model_dir, "m3", 0.41, basis="new-prompts", rescore=must_not_rescore)
    assert second.promoted and second.previous_value == 0.40


@pytest.mark.parametrize("value", [None, float("nan")])
def test_no_value_never_promotes(uri, model_dir, value):
    _, alone = add(uri, model_dir, "m1", value)
    assert not alone.promoted and alone.champion_version is None and champion(uri, NAME) is None
    assert alone.reason == ("version 1 has no verifier value (not scored, or its scorer failed on every row): "
                            "no champion")
    add(uri, model_dir, "m2", 0.1)
    _, after = add(uri, model_dir, "m3", value)
    assert not after.promoted and after.champion_version == 2
    assert after.reason.endswith(": kept champion version 2") and "version 3" in after.reason


def test_promoting_the_champion_again_changes_nothing(uri, model_dir):
    add(uri, model_dir, "m1", 0.3)
    again = promote(uri, NAME, 1, metric="verifier", value=0.3, basis=BASIS)
    assert not again.promoted and again.champion_version == 1
    assert again.reason == "version 1 (verifier 0.3) already is champion"


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_champion_is_the_first_occurrence_of_the_best_value(uri, model_dir, seed, higher_is_better):
    rng = random.Random(seed)
    values = [rng.choice([0.1, 0.2, 0.3, 0.4, 0.5]) for _ in range(20)]  # few distinct values: many ties
    for i, value in enumerate(values):
        info, result = add(uri, model_dir, f"m{i}", value, higher_is_better=higher_is_better)
        assert info.version == i + 1
        best_so_far = (max if higher_is_better else min)(values[:i + 1])
        assert result.champion_version == values.index(best_so_far) + 1
        assert result.promoted == (result.champion_version == i + 1)
        assert f"version {i + 1}" in result.reason
    best = (max if higher_is_better else min)(values)
    held = champion(uri, NAME)
    assert held.version == values.index(best) + 1 and held.value == best
    assert held.lineage["merged_key"] == f"m{values.index(best)}"


def test_mistakes_are_one_line_value_errors(uri, model_dir):
    folder = model_dir("m1")
    ok = dict(metric="verifier", value=0.1, basis=BASIS, lineage=lineage("m1"))
    cases = [
        (lambda: register(uri, "team/model", folder, **ok), "registered model name 'team/model'"),
        (lambda: register(uri, "", folder, **ok), "registered model name ''"),
        (lambda: register(uri, NAME, folder, **{**ok, "metric": ""}), "metric: a metric name is required"),
        (lambda: register(uri, NAME, folder, **{**ok, "metric": "a*b"}), "a\\*b"),
        (lambda: register(uri, NAME, folder, **{**ok, "basis": "has.dot"}), "basis"),
        (lambda: register(uri, NAME, folder, **{**ok, "value": "high"}), "verifier: value must be a number"),
        (lambda: register(uri, NAME, folder, **{**ok, "lineage": {"adapter_key": "a"}}), "'merged_key' is required"),
        (lambda: register(uri, NAME, folder, **{**ok, "lineage": {"merged_key": "k", "basis": "x"}}),
         "lineage key 'basis'"),
        (lambda: register(uri, NAME, folder / "missing", **ok), "is not a directory"),
        (lambda: promote(uri, NAME, 7, metric="verifier", value=0.1, basis=BASIS), "has no version 7"),
        (lambda: promote(uri, NAME, 1, metric="", value=0.1, basis=BASIS), "metric"),
        (lambda: champion(uri, "a:b"), "registered model name 'a:b'"),
    ]
    register(uri, NAME, folder, **ok)
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value), str(err.value)


def test_champion_of_an_unknown_model_is_none(uri):
    assert champion(uri, "never-registered") is None


def _register_and_promote(uri: str, folder: str, key: str, value: float, start) -> int:
    start.wait()
    info = register(uri, NAME, folder, metric="verifier", value=value, basis=BASIS, lineage=lineage(key))
    promote(uri, NAME, info.version, metric="verifier", value=value, basis=BASIS)
    return info.version


@pytest.mark.slow
def test_concurrent_promotions_leave_the_best_champion(uri, model_dir):
    ctx = multiprocessing.get_context("spawn")
    # Three processes on a store none has opened yet; the best model is registered twice at once.
    # concurrent.futures, not multiprocessing.Pool: a worker that dies fails the test (BrokenProcessPool)
    # instead of leaving its task pending for good.
    with ctx.Manager() as manager:
        start = manager.Event()
        jobs = [(uri, str(model_dir(key)), key, value, start)
                for key, value in (("m1", 0.2), ("m2", 0.9), ("m2", 0.9))]
        with ProcessPoolExecutor(len(jobs), mp_context=ctx) as pool:
            futures = [pool.submit(_register_and_promote, *job) for job in jobs]
            start.set()
            versions = [future.result(timeout=120) for future in futures]
    assert versions[-1] == versions[-2]
    from mlflow import MlflowClient

    assert len(MlflowClient(uri).search_model_versions(f"name='{NAME}'")) == 2
    held = champion(uri, NAME)
    assert held.lineage["merged_key"] == "m2" and held.value == 0.9
