"""The generate → filter → train loop of an experiment with a `loop:` section.

Each round is a partition of the dynamic partitions `<exp>_rounds` ("0", "1", …), and each of its
steps an asset: prompts (the loop's prompts through raw → templated, the same every round) → round_samples →
round_accepted → round_adapter → round_eval, with the `ins` the declared graph gives them
(`trainer.core.graph`). Each step plans its round from its inputs with `rounds.plan_round`, so
the steps agree on the generator and the round's experiment. Dagster forbids an asset depending
on another partition of itself (unless time-partitioned), so a round finds the previous round's
outputs (its generator, and in continue mode its adapter) through the event log, by partition,
and names them in its metadata. Generation, training and merging run in their own processes
through Pipes. A round records its lineage (`rounds.lineage`); the loop continues only from
rounds of the current one.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from trainer.core.config import Experiment
from trainer.core.explain import value_changes
from trainer.core.graph import NODES, STAGES
from trainer.core.store import StageOutput, Store
from trainer.loop import rounds
from trainer.loop.settings import ACCEPTANCE, HELD_OUT, START_FROM_BASE, LoopConfig, loop_config
from trainer.training.launch import model_identity
from trainer.training.base_model import planned_base_model
from trainer.training.spec import TrainingSummary

from .evaluation import answers_table, mlflow_name, promote_model, promotion_metadata, rescore_model, score_figures
from .graph import START_MODEL_NODES, asset_key, ins_and_deps, upstream_keys
from .launch import run_step
from .store_io import latest_metadata, latest_outputs
from .training import GPU_TAG

LOOP_TAG = "sftdag/loop"
# A round's assets: its prompts (the same rows every round, a cache hit after the first: partitioned
# like the others so that one run per round materializes them all) and its steps.
STEPS = ("prompts", "round_samples", "round_accepted", "round_adapter", "round_eval")
LINEAGE = "sftdag/lineage"  # round_eval's metadata: what the round was made with


def rounds_partitions(exp: Experiment) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{exp.name}_rounds")


def round_asset_key(exp: Experiment, step: str) -> dg.AssetKey:
    return asset_key(exp, step)


def loop_tags(exp: Experiment) -> dict[str, str]:
    """One round at a time per experiment (dagster.yaml limits the tag per value), and GPU rounds
    share the one-at-a-time GPU slot with training."""
    return {LOOP_TAG: exp.name, **({GPU_TAG: "true"} if exp.training.gpu else {})}


def start_model(exp: Experiment, cfg: LoopConfig, loaded: StageOutput | None) -> StageOutput:
    """The loop's starting model: the asset the table makes its input (the merged SFT model, a
    GGUF base's conversion), else `loop.start_model` (a model directory, or `base`: model.base
    itself), identified by its files' digests."""
    if loaded is not None:
        return loaded
    if cfg.start_model == START_FROM_BASE:
        if exp.model.base.startswith("builtin:"):
            raise dg.Failure(f"loop.start_model: base needs a pretrained model.base, not {exp.model.base!r}")
        path = Path(planned_base_model(exp.model, exp.store_root, 0, exp.base_dir))
        setting = "loop.start_model: base"
    else:
        path, setting = exp.resolve_path(cfg.start_model), "loop.start_model"
    if not (path / "config.json").is_file():
        raise dg.Failure(f"{setting}: {path} is not a model directory (no config.json)")
    key = Store(exp.store_root).key("merged", {}, {"start_model": model_identity(exp, str(path))})
    return StageOutput("merged", key, path, {}, cache_hit=True)


def start_dependencies(exp: Experiment, cfg: LoopConfig | None = None) -> list[dg.AssetKey]:
    """What round 0's generator needs materialized: the SFT model, or a GGUF base's conversion."""
    return [key for node, key in upstream_keys(exp, "round_samples").items() if node in START_MODEL_NODES]


def _current_start_key(instance: dg.DagsterInstance, exp: Experiment, cfg: LoopConfig) -> str | None:
    """The starting model's key now (its asset's last materialization), None when it has none yet."""
    for key in start_dependencies(exp, cfg):
        keys = latest_metadata(instance, key).get("sftdag/keys")
        return keys.value.get("") if keys is not None else None
    try:
        return start_model(exp, cfg, None).key
    except dg.Failure:
        return None


@dataclass
class LoopState:
    history: list[dict]  # the rounds made with the loop's current lineage, in order
    redo_from: int | None = None  # the first round made otherwise (it and those after are made again)
    changes: list[str] = field(default_factory=list)  # what differs from that round's lineage


def loop_state(instance: dg.DagsterInstance, exp: Experiment) -> LoopState:
    """The completed rounds that the loop continues from: each round's metrics as its round_eval
    recorded them, up to the first round made with other settings (filters, their code, training,
    the starting model: `rounds.lineage`), which is made again instead of continued from."""
    current = current_lineage(instance, exp)
    state = LoopState([])
    for partition in sorted(instance.get_dynamic_partitions(rounds_partitions(exp).name), key=int):
        meta = latest_metadata(instance, round_asset_key(exp, "round_eval"), partition)
        if "heldout_pass1" not in meta:
            break
        made_with = meta[LINEAGE].value if LINEAGE in meta else {}
        if made_with != current:
            state.redo_from, state.changes = int(partition), value_changes(made_with, current, "lineage")
            break
        state.history.append({name: value.value for name, value in meta.items() if not name.startswith("sftdag/")})
    return state


def current_lineage(instance: dg.DagsterInstance, exp: Experiment) -> dict:
    """`rounds.lineage` now, as JSON metadata holds it."""
    cfg = loop_config(exp)
    return _as_json(rounds.lineage(exp, cfg, _current_start_key(instance, exp, cfg)))


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


def round_history(instance: dg.DagsterInstance, exp: Experiment) -> list[dict]:
    return loop_state(instance, exp).history


def _previous(context: dg.AssetExecutionContext, exp: Experiment, steps: tuple[str, ...]) -> dict[str, StageOutput]:
    """Round r-1's outputs of `steps` (by the event log: Dagster has no edge from a partition to the one before)."""
    r = int(context.partition_key)
    if r == 0:
        return {}
    outputs = {step: latest_outputs(context.instance, round_asset_key(exp, step), str(r - 1)) for step in steps}
    for step, out in outputs.items():
        context.log.info(f"round {r - 1}'s {step}: {out.path}")
    return outputs


def build_loop_assets(exp: Experiment) -> list:
    cfg = loop_config(exp)
    partitions = rounds_partitions(exp)
    group = f"{exp.name}_loop"
    # What each step needs of round r-1 (found by partition in the event log).
    previous_steps = {"round_samples": ("round_eval",),
                      "round_accepted": ("round_accepted",) if cfg.training.data == "all_rounds" else (),
                      "round_adapter": ("round_adapter",) if cfg.training.adapter == "continue" else (),
                      "round_eval": ()}

    def plan(context: dg.AssetExecutionContext, node: str, inputs: dict) -> rounds.RoundPlan:
        """The round, planned from this asset's inputs (as the declared graph gives them)."""
        held_out = inputs.get("templated_text", {}).get("eval")
        loaded_start = next((inputs[n] for n in START_MODEL_NODES if n in inputs), None)
        needs_start = any(n in NODES[node].upstream for n in START_MODEL_NODES)
        upstream = rounds.RoundUpstream(
            start_model=start_model(exp, cfg, loaded_start) if needs_start else None, tokenizer=inputs.get("tokenizer"),
            prompts=inputs.get("prompts", {}), held_out=held_out,
            previous=_previous(context, exp, previous_steps[node]))
        return rounds.plan_round(exp, int(context.partition_key), upstream)

    def asset(node: str, kinds: set[str], description: str):
        ins, deps = ins_and_deps(exp, node)
        return dg.asset(key=asset_key(exp, node), ins=ins, deps=deps, kinds=kinds, group_name=group,
                        partitions_def=partitions if NODES[node].partitioned else None,
                        code_version=STAGES[NODES[node].stages[-1]].code_version, description=description)

    @asset("prompts", {"arrow"}, "The loop's prompts through raw → templated (an eval split: each row's "
                                 "generation prompt and reference); built once, the same for every round.")
    def prompts(context: dg.AssetExecutionContext, **inputs) -> dg.Output:
        outputs = rounds.build_prompts(exp, cfg, inputs["tokenizer"])
        return dg.Output(outputs, data_version=dg.DataVersion(outputs["templated"].key), metadata={
            "prompts": outputs["templated"].manifest.get("held_out_prompts", 0),
            "path": dg.MetadataValue.path(str(outputs["templated"].path))})

    @asset("round_samples", {"pytorch"}, "The round's generator samples every loop prompt (its own process).")
    def round_samples(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                      **inputs) -> dg.Output:
        round_plan = plan(context, "round_samples", inputs)
        step = round_plan.samples()
        started = time.time()
        cache_hit = run_step(context, pipes_subprocess_client, step, "generation")
        out = step.output()
        return dg.Output(out, data_version=dg.DataVersion(out.key), metadata={
            "round": round_plan.index, "generator": dg.MetadataValue.path(str(round_plan.generator.path)),
            "samples": out.manifest["samples"], "prompts": out.manifest["prompts"],
            "generated_tokens": out.manifest["tokens"], "generate_seconds": round(time.time() - started, 2),
            "cache_hit": cache_hit})

    @asset("round_accepted", {"python"}, "The samples the loop's filters keep, as training rows; every rejection named.")
    def round_accepted(context: dg.AssetExecutionContext, **inputs) -> dg.Output:
        accepted = plan(context, "round_accepted", inputs).accepted(inputs["round_samples"],
                                                                  replay=inputs["raw_dataset"]["train"])
        metrics = accepted.manifest["metrics"]
        return dg.Output(accepted, data_version=dg.DataVersion(accepted.key), metadata={
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None},
            "rejected_by": dg.MetadataValue.json(metrics.get("rejected_by", {})),
            "training_rows": accepted.manifest["training_rows"],
            "repeated_from_earlier_rounds": accepted.manifest.get("repeated_from_earlier_rounds", 0),
            "replayed_rows": accepted.manifest.get("replayed_rows", 0),
            "preference_pairs": accepted.manifest.get("preference_pairs", 0),
            "path": dg.MetadataValue.path(str(accepted.path))})

    @asset("round_adapter", {"pytorch", "mlflow"},
           "The round's accepted rows packed and trained on the starting model (its own process).")
    def round_adapter(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                      **inputs) -> dg.Output:
        round_plan, accepted = plan(context, "round_adapter", inputs), inputs["round_accepted"]
        if not accepted.manifest["training_rows"]:
            raise dg.Failure(f"round {round_plan.index} accepted no samples: nothing to train "
                             "(loop.stop.min_acceptance stops the loop before such a round)")
        started = time.time()
        _, step = round_plan.adapter(accepted, tags={"dagster_run_id": context.run.run_id,
                                                     "round": str(round_plan.index)})
        pack_seconds = round(time.time() - started, 2)
        run_step(context, pipes_subprocess_client, step, "training")
        summary = step.summary()
        continued = round_plan.previous_adapter
        return dg.Output(step.output(), data_version=dg.DataVersion(step.key), metadata={
            "path": dg.MetadataValue.path(str(step.output_dir)), "packed_rows": summary.train_rows,
            "tokens_trained": summary.trainable_tokens, "train_loss": summary.train_loss,
            "train_seconds": round(summary.train_runtime, 2), "pack_seconds": pack_seconds,
            "continued_from": dg.MetadataValue.text(str(continued) if continued else "")})

    @asset("round_eval", {"pytorch", "safetensors"},
           "The round's adapter merged into the starting model and scored, with the starting model, on the held-out "
           "prompts by the experiment's scorers (their own processes): the next round's generator.")
    def round_eval(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                   **inputs) -> dg.Output:
        round_plan = plan(context, "round_eval", inputs)
        adapter, accepted, r = inputs["round_adapter"], inputs["round_accepted"], round_plan.index
        merge = round_plan.merge(accepted, adapter)
        started = time.time()
        run_step(context, pipes_subprocess_client, merge, "merging")
        out = merge.output()
        scoring = round_plan.scoring(accepted, adapter, out)
        run_step(context, pipes_subprocess_client, scoring, "scoring")
        scoring.output()
        after, before = scoring.score(), scoring.score("base") if scoring.base_score_key else None
        summary = TrainingSummary.from_dict(adapter.manifest)
        metrics = round_metrics(context.instance, exp, r, accepted, summary, after, before)
        sampling = round_plan.pass_at_k_samples(out)
        if sampling is not None:  # pass@k: k samples per held-out prompt, as the loop samples
            run_step(context, pipes_subprocess_client, sampling, "pass@k sampling")
            k = cfg.generation.samples_per_prompt
            metrics[f"heldout_pass{k}"] = rounds.pass_at_k(sampling.output(), round_plan.upstream.held_out,
                                                           exp=round_plan.exp)
        metrics["eval_seconds"] = round(time.time() - started, 2)
        context.log.info(f"round {r}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
        _log_to_mlflow(exp, r, metrics, scoring.answers_path())
        made_with = rounds.lineage(exp, cfg, round_plan.upstream.start_model.key)
        metadata = {**metrics, "path": dg.MetadataValue.path(str(out.path)), "score_version": scoring.score_key,
                    "adapter_dir": dg.MetadataValue.path(str(adapter.path)),
                    "held_out_answers": dg.MetadataValue.md(answers_table(scoring.answers_path())),
                    LINEAGE: dg.MetadataValue.json(_as_json(made_with))}
        if exp.eval.promote.enabled:
            metadata.update(_promote_round(context, pipes_subprocess_client, exp, r, out, adapter, after,
                                           scoring.score_key, summary))
        return dg.Output(out, data_version=dg.DataVersion(out.key), metadata=metadata)

    return [prompts, round_samples, round_accepted, round_adapter, round_eval]


def round_metrics(instance: dg.DagsterInstance, exp: Experiment, r: int, accepted: StageOutput,
                  summary: TrainingSummary, after: dict, before: dict | None) -> dict[str, float | int]:
    """What a round reports (plotted by partition in the UI, logged to MLflow with step = round): the
    filter's figures, the held-out pass@1 by the headline scorer of the round's model and of the
    starting model, every scorer's (per task when rows carry one) and the held-out loss."""
    filtered = accepted.manifest["metrics"]
    samples_meta = latest_metadata(instance, round_asset_key(exp, "round_samples"), str(r))
    adapter_meta = latest_metadata(instance, round_asset_key(exp, "round_adapter"), str(r))
    pass1 = float(after["accuracy"]) if after.get("accuracy") is not None else float("nan")
    start = before.get("accuracy") if before is not None else None
    history = round_history(instance, exp)[:r]
    metrics: dict[str, float | int] = {
        "round": r, "prompts": filtered["prompts"], "samples": filtered["samples"], "accepted": filtered["accepted"],
        ACCEPTANCE: filtered["acceptance_rate"], "coverage": filtered["coverage"],
        "accepted_per_prompt": filtered["accepted_per_prompt"], "duplicate_rate": filtered["duplicate_rate"],
        "truncation_rate": filtered["truncation_rate"], "mean_sample_tokens": filtered["mean_sample_tokens"],
        "tokens_trained": summary.trainable_tokens, HELD_OUT: pass1, "heldout_pass1": pass1,
        "start_pass1": float(start) if start is not None else float("nan"),
        "generate_seconds": samples_meta["generate_seconds"].value if "generate_seconds" in samples_meta else 0.0,
        "filter_seconds": accepted.manifest["filter_seconds"],
        "pack_seconds": adapter_meta["pack_seconds"].value if "pack_seconds" in adapter_meta else 0.0,
        "train_seconds": round(summary.train_runtime, 2),
    }
    for name in ("band_removed_samples", "always_solved_prompts", "replayed_rows", "preference_pairs"):
        if filtered.get(name) is not None or accepted.manifest.get(name) is not None:
            metrics[name] = filtered.get(name, accepted.manifest.get(name))
    metrics.update({f"heldout_{name}": value for name, value in score_figures(after).items()})
    metrics["change_vs_round0"] = pass1 - (history[0]["heldout_pass1"] if history else pass1)
    metrics["change_vs_previous"] = pass1 - (history[-1]["heldout_pass1"] if history else metrics["start_pass1"])
    return metrics


def _promote_round(context, pipes_subprocess_client, exp: Experiment, r: int, merged: StageOutput,
                   adapter: StageOutput, score: dict, score_key: str, summary: TrainingSummary) -> dict:
    """The round's model registered, and promoted only when it beats the holder (the SFT model or
    an earlier round's): the loop never makes a worse model current."""
    score_out = Store(exp.store_root).get("score", score_key)
    lineage = {"sftdag.merged_key": merged.key, "sftdag.adapter_key": adapter.key,
               "sftdag.data_version": str(summary.tags.get("data_version")), "sftdag.experiment": exp.name,
               "sftdag.loop_round": str(r)}

    def rescore(model_dir: str, merged_key: str | None):
        return rescore_model(context, pipes_subprocess_client, exp, model_dir, merged_key, score_out)

    _, decision = promote_model(exp, merged, score, lineage, summary.mlflow_run_id, rescore)
    context.log.info(f"round {r}: {decision.reason}")
    return promotion_metadata(exp, decision)


def _log_to_mlflow(exp: Experiment, r: int, metrics: dict, answers: Path | None = None) -> None:
    """One MLflow run per loop (tagged sftdag.loop), its metrics stepped by round, each round's
    held-out answers an artifact (`round-<r>/answers.jsonl`): a shortcut shows at a glance."""
    try:
        from mlflow.tracking import MlflowClient

        from trainer.training.tracking import get_or_create_experiment, resolve_tracking
    except ImportError:
        return
    uri, name, artifact_location = resolve_tracking(exp)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, f"{name}-loop", artifact_location)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`sftdag.loop` = '{exp.name}'", max_results=1)
    run_id = runs[0].info.run_id if runs else client.create_run(
        experiment_id, run_name=f"{exp.name} loop", tags={"sftdag.loop": exp.name}).info.run_id
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and value == value:  # NaN is not a metric
            client.log_metric(run_id, mlflow_name(key), float(value), step=r)
    if answers is not None and answers.is_file():
        client.log_artifact(run_id, str(answers), f"round-{r}")
