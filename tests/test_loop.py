"""The generate → filter → train loop through a real Dagster instance, on a tiny model."""

import json
import sys

import dagster as dg
import pytest

from assets.loop import round_asset_key, round_history
from pipelines.cli import run_loop
from pipelines.schedules import next_round_decision

from .conftest import small_rows
from .test_training_assets import TINY_MODEL, TINY_TRAINING

# Every sample of a few words is kept, so a random tiny model has something to train on.
LOOP = {"prompts": {"source": {"builtin": "default", "rows": 6}},
        "generation": {"samples_per_prompt": 2, "temperature": 1.0, "max_new_tokens": 6, "seed": 3},
        "filters": [{"length": {"min_tokens": 1}}, "dedup"], "drop_truncated": False,
        "training": {"max_steps": 3},  # a round's own setting; the SFT trains TINY_TRAINING's 4
        "stop": {"max_rounds": 2}}


@pytest.mark.slow
def test_two_rounds_through_dagster_then_stop(make_experiment, instance):
    exp = make_experiment(name="tiny_loop", rows=small_rows(60), data={"name": "loop_data", "eval": {"fraction": 0.1}},
                          model=TINY_MODEL, training=TINY_TRAINING, loop=LOOP)
    assert "not materialized yet" in next_round_decision(exp, instance).reason
    result = run_loop(exp, 3, instance)

    assert [r["round"] for r in result["rounds"]] == [0, 1]
    assert result["stopped_because"] == "max_rounds 2 reached"
    history = round_history(instance, exp)
    for r, h in enumerate(history):
        assert h["prompts"] == 6 and h["samples"] == 12
        assert 0 < h["accepted"] <= 12 and h["acceptance_rate"] == pytest.approx(h["accepted"] / 12)
        assert 0 <= h["heldout_pass2"] <= 1  # 2 samples per held-out prompt (pass_at_k tested below)
        samples = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=round_asset_key(exp, "round_samples"), asset_partitions=[str(r)]), limit=1).records[0]
        assert samples.asset_materialization.metadata["samples"].value == 12
    # Round 1 generates with round 0's merged model; both train a fresh adapter on the start model.
    gen1 = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=round_asset_key(exp, "round_samples"), asset_partitions=["1"]), limit=1).records[0]
    eval0 = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=round_asset_key(exp, "round_eval"), asset_partitions=["0"]), limit=1).records[0]
    assert gen1.asset_materialization.metadata["generator"].value == eval0.asset_materialization.metadata["path"].value
    assert history[0]["adapter_dir"] != history[1]["adapter_dir"]
    from trainer.training.spec import TrainingSummary

    assert all(TrainingSummary.read(h["adapter_dir"]).global_step == 3 for h in history)
    # Accepted + rejected = samples, each rejection named.
    accepted_dir = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=round_asset_key(exp, "round_accepted"), asset_partitions=["0"]), limit=1).records[0]
    path = accepted_dir.asset_materialization.metadata["path"].value
    rejected = [json.loads(line) for line in open(f"{path}/rejected.jsonl")]
    trained = [json.loads(line) for line in open(f"{path}/train.jsonl")]
    assert len(rejected) + len(trained) == 12 and all(r["filter"] and r["reason"] for r in rejected)

    # The stop rule fired: no further round is asked for, and the reason says why.
    decision = next_round_decision(exp, instance)
    assert decision.round is None and "max_rounds 2 reached" in decision.reason

    # Round metrics in MLflow, step = round.
    from mlflow.tracking import MlflowClient

    from trainer.training.tracking import resolve_tracking

    uri, name, _ = resolve_tracking(exp)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(f"{name}-loop").experiment_id],
                                filter_string="tags.`sftdag.loop` = 'tiny_loop'")
    steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "acceptance_rate")]
    assert steps == [(0, history[0]["acceptance_rate"]), (1, history[1]["acceptance_rate"])]


    # A loop that starts from a model directory of its own needs no SFT run.
    start = eval0.asset_materialization.metadata["path"].value
    other = make_experiment(name="from_dir", data={"name": "loop_data", "eval": {"fraction": 0.1}}, model=TINY_MODEL,
                            training=TINY_TRAINING, loop={**LOOP, "start_model": start, "stop": {"max_rounds": 1}})
    from assets.training import merged_asset_key

    result = run_loop(other, 1, instance)
    assert [r["round"] for r in result["rounds"]] == [0]
    assert instance.get_latest_materialization_event(merged_asset_key(other)) is None


def test_next_round_is_asked_for_until_a_rule_stops_the_loop(make_experiment, instance):
    """The schedule's and sensor's decision, both ways, on recorded round metrics."""
    from assets.loop import rounds_partitions
    from assets.training import merged_asset_key

    exp = make_experiment(name="decide", loop={**LOOP, "stop": {"max_rounds": 5, "min_acceptance": 0.2}})
    instance.report_runless_asset_event(dg.AssetMaterialization(merged_asset_key(exp)))
    assert next_round_decision(exp, instance).round == 0
    partitions = rounds_partitions(exp)
    for r, rate in enumerate([0.5, 0.1]):
        instance.add_dynamic_partitions(partitions.name, [str(r)])
        record_round(instance, exp, r, acceptance_rate=rate)
        decision = next_round_decision(exp, instance)
        if r == 0:
            assert decision.round == 1
    assert decision.round is None and "acceptance 0.1 below floor 0.2" in decision.reason


def record_round(instance, exp, r: int, **metrics) -> None:
    """A completed round as its round_eval records it (metrics and the lineage it was made with)."""
    from assets.loop import LINEAGE, current_lineage

    instance.report_runless_asset_event(dg.AssetMaterialization(
        round_asset_key(exp, "round_eval"), partition=str(r),
        metadata={"round": r, "acceptance_rate": 0.5, "heldout_pass1": 0.3, "held_out": 0.3, **metrics,
                  LINEAGE: dg.MetadataValue.json(current_lineage(instance, exp))}))


def test_rounds_made_with_other_settings_are_made_again(make_experiment, instance, tmp_path, monkeypatch, request):
    """Changed filters, or an edit of a module the verifier imports, start a new lineage: the loop
    continues from no round of the old one, and says which rounds it reuses and why."""
    from assets.loop import loop_state, rounds_partitions
    from assets.training import merged_asset_key

    (tmp_path / "lineage_checks").mkdir()
    (tmp_path / "lineage_checks" / "__init__.py").write_text("")
    (tmp_path / "lineage_checks" / "normal.py").write_text("def norm(s):\n    return s.strip()\n")
    (tmp_path / "lineage_checks" / "verify.py").write_text(
        "from .normal import norm\n\ndef verify(sample, text):\n    return norm(text) == sample['reference']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # imported by this test only: gone after it
    request.addfinalizer(lambda: [sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] == "lineage_checks"])
    loop = {**LOOP, "filters": [{"verifier": "lineage_checks.verify:verify"}], "stop": {"max_rounds": 5}}
    exp = make_experiment(name="lineage", loop=loop)
    instance.report_runless_asset_event(dg.AssetMaterialization(merged_asset_key(exp)))
    instance.add_dynamic_partitions(rounds_partitions(exp).name, ["0", "1"])
    record_round(instance, exp, 0)
    record_round(instance, exp, 1)
    assert len(loop_state(instance, exp).history) == 2 and next_round_decision(exp, instance).round == 2

    # The verifier's helper module is edited: round 0 on were filtered by other code.
    (tmp_path / "lineage_checks" / "normal.py").write_text("def norm(s):\n    return s.strip().lower()\n")
    state = loop_state(instance, exp)
    assert state.history == [] and state.redo_from == 0 and next_round_decision(exp, instance).round == 0
    assert any(line.startswith("lineage.filter_code.lineage_checks.verify:verify.lineage_checks.normal: ") for line in state.changes)

    # Round 0 made again under the new code; round 1 still has the old lineage.
    record_round(instance, exp, 0)
    state = loop_state(instance, exp)
    assert len(state.history) == 1 and state.redo_from == 1 and next_round_decision(exp, instance).round == 1

    # Other filters: a new lineage again, the change named.
    changed = make_experiment(name="lineage", loop={**loop, "filters": [{"verifier": "lineage_checks.verify:verify"}, "dedup"]})
    state = loop_state(instance, changed)
    assert state.redo_from == 0 and state.history == []
    assert "lineage.loop.filters: 1 → 2 items" in state.changes
    # The stop rules are not part of the lineage: raising max_rounds continues the same rounds.
    more = make_experiment(name="lineage", loop={**loop, "stop": {"max_rounds": 9}})
    assert len(loop_state(instance, more).history) == 1


@pytest.mark.slow
def test_loop_killed_while_training_a_round_resumes_it(tmp_path):
    """SIGKILL `sftdag loop` while round 0 trains: its training process dies with it; run it again:
    the samples are not generated again, training resumes from its last checkpoint, and the killed
    run is marked failed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from trainer.training.spec import TrainingSummary

    from .conftest import write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", small_rows(60))
    config = {"name": "kill_loop", "store": "store", "tokenizer": {"path": "builtin:tiny"}, "model": TINY_MODEL,
              "data": {"name": "kill_data", "source": {"path": "data/*.jsonl"}, "max_length": 128,
                       "eval": {"fraction": 0.1}},
              "training": {**TINY_TRAINING, "max_steps": 30, "save_steps": 2},
              "loop": {**LOOP, "training": {}}}  # rounds train the 30 steps of the experiment
    experiment = tmp_path / "kill_loop.yaml"
    experiment.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipelines.cli", "loop", str(experiment), "--rounds", "1"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
    store = tmp_path / "store"
    deadline = time.time() + 420
    try:
        while True:  # round 0 sampled, and its adapter has a checkpoint
            sampled = list(store.glob("samples/*/manifest.json"))
            # a complete checkpoint: Trainer writes trainer_state.json last (a kill before it leaves
            # a checkpoint that resuming rightly skips)
            checkpoints = [p for p in store.glob("adapter/*.partial/checkpoint-*/trainer_state.json")
                           if sampled and p.stat().st_mtime > sampled[0].stat().st_mtime]
            if checkpoints or proc.poll() is not None or time.time() > deadline:
                break
            time.sleep(0.2)
        assert checkpoints, (tmp_path / "first.log").read_text()[-3000:]
        # SIGKILL `sftdag` alone (as the OOM killer would): the training process it started must
        # not train on as an orphan.
        import psutil

        def command_line(p: psutil.Process) -> str:
            try:
                return " ".join(p.cmdline())
            except psutil.Error:
                return ""

        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("trainer.training.train" in command_line(c) for c in children)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [command_line(c) for c in alive]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    shards = {p: p.stat().st_mtime_ns for p in store.glob("samples/*/samples-*.arrow")}
    assert shards

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "process is gone; ended it" in again.stderr, again.stderr[-3000:]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert [r["round"] for r in result["rounds"]] == [0]
    assert {p: p.stat().st_mtime_ns for p in shards} == shards  # the round's samples, not generated again
    summary = TrainingSummary.read(result["rounds"][0]["adapter_dir"])
    assert summary.resumed_from_step and summary.resumed_from_step >= 2 and summary.global_step == 30, (
        summary, again.stderr[-3000:])


def test_pass_at_k_counts_prompts_with_any_exact_answer(tmp_path):
    import pyarrow as pa

    from trainer.core.arrow_io import write_table
    from trainer.core.store import StageOutput
    from trainer.loop.rounds import pass_at_k
    from trainer.training.generate import SAMPLES_SCHEMA

    held = tmp_path / "held"
    held.mkdir()
    (held / "held_out.jsonl").write_text("".join(json.dumps({"row_id": i, "prompt": f"q{i}", "reference": ref}) + "\n"
                                                 for i, ref in enumerate(["12", "7", "abc"])))
    rows = [("0", 0, " 12"), ("0", 1, "13"), ("1", 0, "8"), ("1", 1, "77"), ("2", 0, "x"), ("2", 1, "abc\n")]
    samples = tmp_path / "samples"
    samples.mkdir()
    write_table(samples / "samples-00000.arrow", pa.Table.from_pylist(
        [{"prompt_id": p, "sample_index": i, "text": text, "token_count": 1, "stop_reason": "end_of_turn",
          "round": 0, "generator_version": "g", "seed": 0} for p, i, text in rows], schema=SAMPLES_SCHEMA))
    as_output = lambda path: StageOutput("x", "k", path, {}, True)  # noqa: E731
    assert pass_at_k(as_output(samples), as_output(held)) == pytest.approx(2 / 3)


def test_all_rounds_trains_each_distinct_accepted_row_once(make_experiment):
    """data: all_rounds: round 1's training rows are round 0's plus round 1's new ones; an answer
    accepted again (the same question, the same text) is counted, not added twice."""
    import pyarrow as pa

    from trainer.core.arrow_io import write_table
    from trainer.core.store import StageOutput
    from trainer.data.prepare import DataPipeline
    from trainer.loop import rounds
    from trainer.loop.settings import loop_config
    from trainer.training.generate import SAMPLES_SCHEMA

    exp = make_experiment(name="union", loop={**LOOP, "filters": ["dedup"], "training": {"data": "all_rounds"}})
    cfg = loop_config(exp)
    prompts = rounds.build_prompts(exp, cfg, DataPipeline(exp, progress=False).tokenizer_output())
    first, second = list(rounds._prompt_rows(exp, prompts))[:2]

    def samples(r: int, answers: list[tuple[str, str]]) -> StageOutput:
        path = exp.resolve_path(f"samples-{r}")
        path.mkdir()
        write_table(path / "samples-00000.arrow", pa.Table.from_pylist([
            {"prompt_id": p, "sample_index": i, "text": t, "token_count": 2, "stop_reason": "eot", "round": r,
             "generator_version": f"g{r}", "seed": 0} for i, (p, t) in enumerate(answers)], schema=SAMPLES_SCHEMA))
        return StageOutput("samples", f"samples-{r}", path, {}, cache_hit=False)

    round0 = rounds.build_accepted(exp, cfg, 0, samples(0, [(first, " 12"), (second, " ab")]), prompts, None)
    round1 = rounds.build_accepted(exp, cfg, 1, samples(1, [(first, " 12"), (second, " ba")]), prompts, round0)

    def trained(output):
        return [json.loads(line) for line in open(output.path / rounds.ACCEPTED_ROWS)]

    assert len(trained(round0)) == 2 and round0.manifest["repeated_from_earlier_rounds"] == 0
    rows = trained(round1)
    assert rows[:2] == trained(round0) and len(rows) == 3
    assert [r.get("completion") or r["messages"][-1]["content"] for r in rows] == [" 12", " ab", " ba"]
    assert round1.manifest["repeated_from_earlier_rounds"] == 1
    assert round1.manifest["metrics"]["accepted"] == 2  # the filters still accepted both samples
