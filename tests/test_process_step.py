"""Process steps: specs through JSON and back, a step run to completion, and the Dagster launch helper.

Run as `python -m tests.test_process_step SPEC.json`, this module is itself a tiny process step:
it writes a `toy` stage output into its store (or, told to, exits without writing it)."""

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.core.entry_point import run_entry_point
from trainer.core.process_step import JsonSpec, ProcessStep, SpecError, spec_from_json, spec_to_json
from trainer.core.store import Store

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ToySpec(JsonSpec):
    store: str
    key: str
    text: str
    complete: bool = True  # False: exit as if done, without writing the output


def toy_step(store: Store, key: str, text: str = "hello", complete: bool = True) -> ProcessStep:
    return ProcessStep("toy", key, store, ToySpec(store.location, key, text, complete),
                       "tests.test_process_step").write_spec()


def _toy(spec_path: Path) -> str:
    spec = ToySpec.load(spec_path)
    if not spec.complete:
        return "exited without writing anything"
    if spec.text == "raise":
        raise ValueError(f"{spec_path.name}: row 3: not a number")

    def build(tmp: Path) -> dict:
        (tmp / "text.txt").write_text(spec.text)
        return {"chars": len(spec.text)}

    return f"wrote {Store(spec.store).get_or_build('toy', spec.key, build).path}"


# --- specs through JSON --------------------------------------------------------------------------


def _through_json(spec):
    data = json.loads(json.dumps(spec_to_json(spec)))
    return data, type(spec).load(data)


def test_training_spec_round_trips_with_its_experiment(make_experiment, tmp_path):
    from trainer.training.spec import TrainingSpec

    exp = make_experiment(name="rt", training={"learning_rate": 0.03, "lora": {"r": 2, "target_modules": ["q_proj"]}},
                          loop={"prompts": {"source": {"builtin": "default", "rows": 3}}})
    spec = TrainingSpec(experiment=exp, train_shards=tmp_path / "train", tokenizer_dir=tmp_path / "tok",
                        output_dir=tmp_path / "out", held_out=tmp_path / "held_out.jsonl", base_model="some/hub-id",
                        tags={"data_version": "dv", "round": "2"})
    data, back = _through_json(spec)
    assert back == spec and back.experiment == exp and back.experiment.base_dir == exp.base_dir
    assert isinstance(back.train_shards, Path) and isinstance(back.held_out, Path) and back.eval_shards is None
    assert data["experiment"]["base_dir"] == exp.base_dir and data["train_shards"] == str(tmp_path / "train")
    # Relative paths in the experiment resolve where they did: its store, its data.
    assert back.experiment.store_root == exp.store_root
    # A relative output directory is made absolute once, where it is planned.
    assert TrainingSpec.load({**data, "output_dir": "rel"}).output_dir == Path.cwd() / "rel"


def test_training_spec_errors_are_one_line(make_experiment, tmp_path):
    from trainer.training.spec import TrainingSpec

    data = spec_to_json(TrainingSpec(experiment=make_experiment(), train_shards=tmp_path, tokenizer_dir=tmp_path,
                                     output_dir=tmp_path / "out"))
    for name in ("experiment", "train_shards", "tokenizer_dir", "output_dir"):
        with pytest.raises(SpecError, match=f"^spec: '{name}' is required$"):
            TrainingSpec.load({k: v for k, v in data.items() if k != name})
    with pytest.raises(SpecError, match=r"^spec: unknown key\(s\) \['score_path'\]"):
        TrainingSpec.load({**data, "score_path": "x"})
    with pytest.raises(SpecError, match=r"no such spec file"):
        TrainingSpec.load(tmp_path / "missing.json")


def test_merge_sampling_and_conversion_specs_round_trip(tmp_path):
    from trainer.loop.sample import SamplingSpec
    from trainer.models.convert import ConversionSpec
    from trainer.training.generate import SamplingSettings
    from trainer.training.spec import MergeSpec, ScoreSpec

    specs = [
        MergeSpec(adapter_dir=tmp_path / "adapter", base_model=str(tmp_path / "base"), tokenizer_dir=tmp_path / "tok",
                  store=str(tmp_path / "store"), merged_key="m1", eot_token="<|im_end|>"),
        MergeSpec(adapter_dir=tmp_path / "adapter", base_model="hub/id", tokenizer_dir=tmp_path / "tok",
                  store="s3://bucket/prefix", merged_key="m1"),
        ScoreSpec(store=str(tmp_path / "store"), tokenizer_dir=tmp_path / "tok", accuracy_rows=5, max_new_tokens=7,
                  models={"merged": {"model_dir": str(tmp_path / "m"), "score_key": "s1", "versions": {"basis": "b"}},
                          "base": {"model_dir": "hub/id", "score_key": "s2", "versions": {}}},
                  eot_token="<|im_end|>", held_out=tmp_path / "held_out.jsonl",
                  scorers=["exact", {"verifier": "checks:verify"}], scorers_where="eval.scorers", scorers_base_dir="/x"),
        SamplingSpec(model_dir=tmp_path / "model", tokenizer_dir=tmp_path / "tok", prompts=tmp_path / "p.jsonl",
                     settings=SamplingSettings(samples_per_prompt=3, temperature=0.7, top_p=0.9, max_new_tokens=5,
                                               seed=11, batch_size=2),
                     stop_tokens=["<|im_end|>"], out_dir=tmp_path / "samples", round_index=2, generator_version="g"),
        ConversionSpec(gguf_file=tmp_path / "m.gguf", store=str(tmp_path / "store"), key="c1"),
    ]
    for spec in specs:
        data, back = _through_json(spec)
        assert back == spec, type(spec).__name__
        for f in dataclasses.fields(spec):
            assert type(getattr(back, f.name)) is type(getattr(spec, f.name)), f.name
    assert isinstance(_through_json(specs[3])[1].settings, SamplingSettings)
    # Values are read by their type hints, as the hand-written readers did.
    assert spec_from_json(ConversionSpec, {"gguf_file": "m.gguf", "store": "s", "key": "k"}).gguf_file == Path("m.gguf")
    with pytest.raises(SpecError, match=r"^spec.settings: sampling samples_per_prompt: must be at least 1"):
        SamplingSpec.load({**spec_to_json(specs[3]), "settings": {"samples_per_prompt": 0}})
    with pytest.raises(SpecError, match=r"^spec.round_index: expected int, got 'two'$"):
        SamplingSpec.load({**spec_to_json(specs[3]), "round_index": "two"})


def test_spec_file_is_rewritten_only_when_it_changes(tmp_path):
    store = Store(tmp_path / "store")
    step = toy_step(store, "k1")
    assert step.spec_path == store.root / "toy" / ".specs" / "k1.json"
    stamp = step.spec_path.stat().st_mtime_ns
    assert ToySpec.load(step.spec_path) == step.spec
    toy_step(store, "k1")
    assert step.spec_path.stat().st_mtime_ns == stamp
    assert ToySpec.load(toy_step(store, "k1", text="other").spec_path).text == "other"


# --- a step and its process ----------------------------------------------------------------------


def test_incomplete_step_runs_its_process_and_is_complete(tmp_path):
    store = Store(tmp_path / "store")
    step = toy_step(store, "k1", text="hi there")
    assert not step.complete and step.missing() == [store.path("toy", "k1")]
    assert step.command() == [sys.executable, "-m", "tests.test_process_step", str(step.spec_path)]
    done = subprocess.run(step.command(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert step.complete
    out = step.output()
    assert out.path == step.output_dir == store.path("toy", "k1")
    assert (out.path / "text.txt").read_text() == "hi there" and out.manifest["chars"] == 8


def test_a_step_is_complete_only_with_every_output_it_leaves(tmp_path):
    store = Store(tmp_path / "store")
    step = dataclasses.replace(toy_step(store, "k1"), also=(("toy", "k2"),))
    for key in ("k1", "k2"):
        assert subprocess.run(toy_step(store, key).command(), cwd=REPO, timeout=120).returncode == 0
        assert step.complete == (key == "k2")
    assert step.output().key == "k1"


def test_training_step_keeps_the_accelerate_command(make_experiment, tmp_path):
    from trainer.training.launch import TrainingStep, training_command
    from trainer.training.spec import TrainingSpec

    exp = make_experiment(training={"num_processes": 2})
    spec = TrainingSpec(experiment=exp, train_shards=tmp_path, tokenizer_dir=tmp_path, output_dir=tmp_path / "o")
    step = TrainingStep("adapter", "k", Store(exp.store_root), spec, "trainer.training.train")
    assert step.command() == training_command(exp, step.spec_path)
    # accelerate's launcher, started so that it dies with the sftdag process that starts it
    assert step.command()[:6] == [sys.executable, "-m", "trainer.core.entry_point", sys.executable, "-m",
                                  "accelerate.commands.launch"]
    assert step.spec_path == exp.store_root / "adapter" / ".specs" / "k.json"


# --- through Dagster -----------------------------------------------------------------------------


def _materialize(store: Store, key: str, complete: bool, text: str = "hello"):
    import dagster as dg

    from assets.launch import run_step

    @dg.asset(name="toy")
    def toy(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.Output:
        step = toy_step(store, key, text=text, complete=complete)
        cache_hit = run_step(context, pipes_subprocess_client, step, "the toy process")
        return dg.Output(None, metadata={"cache_hit": cache_hit, "path": str(step.output().path)})

    return dg.materialize([toy], resources={"pipes_subprocess_client": dg.PipesSubprocessClient(cwd=str(REPO))},
                          raise_on_error=False)


def test_run_step_through_pipes_then_cache_hit_and_failure(tmp_path):
    store = Store(tmp_path / "store")
    first = _materialize(store, "k1", complete=True)
    assert first.success
    (event,) = first.get_asset_materialization_events()
    assert event.materialization.metadata["cache_hit"].value is False
    assert (store.path("toy", "k1") / "text.txt").read_text() == "hello"
    again = _materialize(store, "k1", complete=True)
    assert again.get_asset_materialization_events()[0].materialization.metadata["cache_hit"].value is True

    failed = _materialize(store, "k2", complete=False)
    assert not failed.success
    (failure,) = failed.get_step_failure_events()
    message = failure.event_specific_data.error.message
    assert f"the toy process exited without completing {store.path('toy', 'k2')}" in message


def test_a_failing_process_is_failed_with_its_own_reason(tmp_path):
    """The user's last line is why the process failed, not Pipes' exit code."""
    from pipelines.user_errors import failure_reason

    store = Store(tmp_path / "store")
    failed = _materialize(store, "k3", complete=True, text="raise")
    assert not failed.success
    (failure,) = failed.get_step_failure_events()
    assert failure_reason(failure) == "the toy process failed: k3.json: row 3: not a number"


# --- merging and scoring, the real process -------------------------------------------------------


@pytest.mark.slow
def test_merge_and_score_steps_leave_the_merged_model_and_the_scores(make_experiment, tmp_path, tmp_path_factory):
    """`python -m trainer.training.merge SPEC` then `python -m trainer.training.score SPEC`, without
    Dagster: the merged model, then a score stage for it and one for its base (`score.json`, the
    answers beside it); new held-out prompts rescore both without merging again."""
    from tests.train_helpers import held_out_rows, lora_run, train_env, write_held_out
    from trainer.core.schemas import SCORE
    from trainer.core.store import StageOutput
    from trainer.training.launch import plan_merge, plan_score

    spec, summary = lora_run(tmp_path_factory)
    adapter = StageOutput("adapter", "adapter-1", Path(spec["output_dir"]), summary.to_dict(), cache_hit=True)
    exp = make_experiment(training={"accuracy_rows": 3, "max_new_tokens": 4})
    held_out = write_held_out(tmp_path / "held_out.jsonl", held_out_rows(4))
    merge = plan_merge(exp, adapter, Path(spec["tokenizer_dir"]))
    store = Store(exp.store_root)
    assert merge.missing() == [store.path("merged", merge.key)]
    done = subprocess.run(merge.command(), env=train_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = merge.output()
    step = plan_score(exp, merged, adapter, Path(spec["tokenizer_dir"]), held_out)
    assert step.missing() == [store.path("score", step.score_key), store.path("score", step.base_score_key)]
    done = subprocess.run(step.command(), env=train_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert step.complete
    score, base = step.score(), step.score("base")
    assert json.loads((store.path("score", step.score_key) / SCORE).read_text()) == score
    for s in (score, base):
        assert s["scored_rows"] == 3 and 0 <= s["accuracy"] <= 1 and s["headline"] == "exact"
        assert s["held_out_loss"]["loss"] > 0 and s["basis"] == score["basis"]
    assert score["score_version"] == step.score_key and score["merged_version"] == merged.key
    assert len(step.answers_path().read_text().splitlines()) == 3
    assert not list((store.root / "score").glob(".tmp-*"))

    weights = store.path("merged", merge.key) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    write_held_out(held_out, held_out_rows(4)[::-1])  # the eval split changed
    assert plan_merge(exp, adapter, Path(spec["tokenizer_dir"])).complete
    rescore = plan_score(exp, merged, adapter, Path(spec["tokenizer_dir"]), held_out)
    assert rescore.score_key != step.score_key and len(rescore.missing()) == 2
    done = subprocess.run(rescore.command(), env=train_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rescore.complete and rescore.score()["score_version"] == rescore.score_key
    assert rescore.score()["basis"] != score["basis"]  # another held-out set: not comparable
    assert weights.stat().st_mtime_ns == stamp  # scored again, not merged again


if __name__ == "__main__":
    raise SystemExit(run_entry_point(None, "tests.test_process_step", _toy))
