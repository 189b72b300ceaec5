"""The generate → filter → train loop of an experiment with a `loop:` section.

Each round is a partition of the dynamic partitions `<exp>_rounds` ("0", "1", …), and each of
its steps an asset: round_samples → round_accepted → round_adapter → round_eval (see
`trainer.loop.rounds`). Dagster forbids an asset depending on another partition of itself (unless
time-partitioned), so a round finds the previous round's outputs (its generator, and in
continue mode its adapter) through the event log, by partition, and names them in its metadata.
Generation, training and merging run in their own processes through Pipes.
"""

import time
from pathlib import Path

import dagster as dg

from trainer.core.config import Experiment
from trainer.core.store import StageOutput, content_key
from trainer.loop import rounds
from trainer.loop.settings import ACCEPTANCE, HELD_OUT, START_FROM_BASE, LoopConfig, loop_config
from trainer.models.gguf import is_gguf_base
from trainer.training.launch import held_out_file, merge_command, model_identity, plan_adapter, plan_merge, training_command
from trainer.training.models import planned_base_model
from trainer.training.spec import TrainingSummary

from .data import data_asset_key, tokenizer_asset_key
from .models import base_model_asset_key
from .store_io import latest_metadata, latest_outputs
from .training import GPU_TAG, merged_asset_key

LOOP_TAG = "sftdag/loop"
STEPS = ("round_samples", "round_accepted", "round_adapter", "round_eval")


def rounds_partitions(exp: Experiment) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{exp.name}_rounds")


def round_asset_key(exp: Experiment, step: str) -> dg.AssetKey:
    return dg.AssetKey([exp.name, "loop", step])


def loop_tags(exp: Experiment) -> dict[str, str]:
    """One round at a time per experiment (dagster.yaml limits the tag per value), and GPU rounds
    share the one-at-a-time GPU slot with training."""
    return {LOOP_TAG: exp.name, **({GPU_TAG: "true"} if exp.training.gpu else {})}


def round_history(instance: dg.DagsterInstance, exp: Experiment) -> list[dict]:
    """The completed rounds, in order: each round's metrics as its round_eval recorded them."""
    history = []
    for partition in sorted(instance.get_dynamic_partitions(rounds_partitions(exp).name), key=int):
        meta = latest_metadata(instance, round_asset_key(exp, "round_eval"), partition)
        if "heldout_pass1" not in meta:
            break
        history.append({name: value.value for name, value in meta.items() if not name.startswith("sftdag/")})
    return history


def _start_model(context: dg.AssetExecutionContext, exp: Experiment, cfg: LoopConfig) -> StageOutput:
    """The loop's starting model: `loop.start_model` (a local model directory), else the
    experiment's merged SFT model (its latest materialization; a declared dependency)."""
    if cfg.start_model is None:
        return latest_outputs(context.instance, merged_asset_key(exp))
    if cfg.start_model == START_FROM_BASE:
        return _base_model(exp)
    path = exp.resolve_path(cfg.start_model)
    if not (path / "config.json").is_file():
        raise dg.Failure(f"loop.start_model: {path} is not a model directory (no config.json)")
    key = content_key("merged", inputs=[], params={"start_model": model_identity(exp, str(path))})
    return StageOutput("merged", key, path, {}, cache_hit=True)


def _base_model(exp: Experiment) -> StageOutput:
    """`loop.start_model: base`: the experiment's pretrained base itself (ReST-EM starts there, no
    SFT first); a GGUF base is its converted directory, a declared dependency."""
    if not is_gguf_base(exp.model.base) and exp.model.base.startswith("builtin:"):
        raise dg.Failure(f"loop.start_model: base needs a pretrained model.base, not {exp.model.base!r}")
    path = Path(planned_base_model(exp.model, exp.store_root, 0, exp.base_dir))
    if not (path / "config.json").is_file():
        raise dg.Failure(f"loop.start_model: base: {path} is not a model directory yet: materialize "
                         f"{base_model_asset_key(exp).to_user_string() if is_gguf_base(exp.model.base) else 'it'} first")
    key = content_key("merged", inputs=[], params={"start_model": model_identity(exp, str(path))})
    return StageOutput("merged", key, path, {}, cache_hit=True)


def start_dependencies(exp: Experiment, cfg: LoopConfig) -> list[dg.AssetKey]:
    """What round 0's generator needs materialized: the SFT model, or a GGUF base's conversion."""
    if cfg.start_model is None:
        return [merged_asset_key(exp)]
    if cfg.start_model == START_FROM_BASE and is_gguf_base(exp.model.base):
        return [base_model_asset_key(exp)]
    return []


def _previous(context: dg.AssetExecutionContext, exp: Experiment, step: str) -> StageOutput:
    round_index = int(context.partition_key)
    output = latest_outputs(context.instance, round_asset_key(exp, step), str(round_index - 1))
    context.log.info(f"round {round_index - 1}'s {step}: {output.path}")
    return output


def build_loop_assets(exp: Experiment) -> list:
    cfg = loop_config(exp)
    partitions = rounds_partitions(exp)
    group = exp.data_group
    common = dict(partitions_def=partitions, group_name=f"{exp.name}_loop")
    tok_in = {"tok": dg.AssetIn(tokenizer_asset_key(group))}
    # With loop.start_model the SFT model is not needed (nor materialized by `sftdag loop`).
    start_deps = start_dependencies(exp, cfg)

    @dg.asset(key=round_asset_key(exp, "round_samples"), ins=tok_in, deps=start_deps, kinds={"pytorch"}, **common,
              description="The round's generator samples every loop prompt (its own process).")
    def round_samples(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                      tok: StageOutput) -> dg.Output:
        r = int(context.partition_key)
        generator = _start_model(context, exp, cfg) if r == 0 else _previous(context, exp, "round_eval")
        prompts = rounds.build_prompts(exp, cfg, tok)
        plan = rounds.plan_samples(exp, cfg, r, generator, tok, prompts["templated"])
        started, cache_hit = time.time(), plan.complete
        if not cache_hit:
            pipes_subprocess_client.run(command=rounds.sample_command(plan), context=context)
            if not plan.complete:
                raise dg.Failure(f"generation exited without completing {plan.out_dir}")
        out = plan.output()
        return dg.Output(out, data_version=dg.DataVersion(out.key), metadata={
            "round": r, "generator": dg.MetadataValue.path(str(generator.path)), "samples": out.manifest["samples"],
            "prompts": out.manifest["prompts"], "generated_tokens": out.manifest["tokens"],
            "generate_seconds": round(time.time() - started, 2), "cache_hit": cache_hit})

    @dg.asset(key=round_asset_key(exp, "round_accepted"), kinds={"python"}, **common,
              ins={"samples": dg.AssetIn(round_asset_key(exp, "round_samples")),
                   "tok": dg.AssetIn(tokenizer_asset_key(group))},
              description="The samples the loop's filters keep, as training rows; every rejection named.")
    def round_accepted(context: dg.AssetExecutionContext, samples: StageOutput, tok: StageOutput) -> dg.Output:
        r = int(context.partition_key)
        previous = _previous(context, exp, "round_accepted") if r > 0 and cfg.training.data == "all_rounds" else None
        accepted = rounds.build_accepted(exp, cfg, r, samples, rounds.build_prompts(exp, cfg, tok), previous)
        metrics = accepted.manifest["metrics"]
        return dg.Output(accepted, data_version=dg.DataVersion(accepted.key), metadata={
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None},
            "rejected_by": dg.MetadataValue.json(metrics.get("rejected_by", {})),
            "training_rows": accepted.manifest["training_rows"],
            "repeated_from_earlier_rounds": accepted.manifest.get("repeated_from_earlier_rounds", 0),
            "path": dg.MetadataValue.path(str(accepted.path))})

    @dg.asset(key=round_asset_key(exp, "round_adapter"), kinds={"pytorch", "mlflow"}, **common,
              deps=start_deps, ins={"accepted": dg.AssetIn(round_asset_key(exp, "round_accepted")), **tok_in,
                   "templated": dg.AssetIn(data_asset_key(group, "templated"))},
              description="The round's accepted rows packed and trained on the starting model (its own process).")
    def round_adapter(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                      accepted: StageOutput, tok: StageOutput, templated: dict) -> dg.Output:
        r = int(context.partition_key)
        if not accepted.manifest["training_rows"]:
            raise dg.Failure(f"round {r} accepted no samples: nothing to train (loop.stop.min_acceptance "
                             "stops the loop before such a round)")
        previous = _previous(context, exp, "round_adapter").path if r > 0 and cfg.training.adapter == "continue" else None
        round_exp = rounds.round_experiment(exp, cfg, r, accepted, _start_model(context, exp, cfg).path, previous)
        started = time.time()
        data = rounds.pack_round(round_exp, tok)
        pack_seconds = round(time.time() - started, 2)
        plan = plan_adapter(round_exp, data, tags={"dagster_run_id": context.run.run_id, "round": str(r)},
                            held_out=held_out_file(templated.get("eval")))
        if not plan.complete:
            pipes_subprocess_client.run(command=training_command(round_exp, plan.spec_path), context=context)
            if not plan.complete:
                raise dg.Failure(f"training exited without writing {plan.output_dir}")
        summary = plan.summary()
        return dg.Output(plan.output(), data_version=dg.DataVersion(plan.key), metadata={
            "path": dg.MetadataValue.path(str(plan.output_dir)), "packed_rows": summary.train_rows,
            "tokens_trained": summary.trainable_tokens, "train_loss": summary.train_loss,
            "train_seconds": round(summary.train_runtime, 2), "pack_seconds": pack_seconds,
            "continued_from": dg.MetadataValue.text(str(previous) if previous else "")})

    @dg.asset(key=round_asset_key(exp, "round_eval"), kinds={"pytorch", "safetensors"}, **common,
              ins={"adapter": dg.AssetIn(round_asset_key(exp, "round_adapter")),
                   "accepted": dg.AssetIn(round_asset_key(exp, "round_accepted")),
                   "tok": dg.AssetIn(tokenizer_asset_key(group)),
                   "templated": dg.AssetIn(data_asset_key(group, "templated"))},
              description="The round's adapter merged into the starting model and scored on the held-out "
                          "prompts (its own process): the next round's generator.")
    def round_eval(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                   adapter: StageOutput, accepted: StageOutput, tok: StageOutput, templated: dict) -> dg.Output:
        r = int(context.partition_key)
        merge = plan_merge(exp, adapter, tok.path, held_out_file(templated.get("eval")))
        started = time.time()
        if not merge.complete:
            pipes_subprocess_client.run(command=merge_command(merge), context=context)
            if not merge.complete:
                raise dg.Failure(f"merging exited without writing {merge.score_path}")
        summary = TrainingSummary.from_dict(adapter.manifest)
        metrics = round_metrics(context.instance, exp, r, accepted, summary, merge.result())
        k = cfg.generation.samples_per_prompt
        if k > 1 and "eval" in templated:  # pass@k: k samples per held-out prompt, as the loop samples
            plan = rounds.plan_samples(exp, cfg, r, merge.output(), tok, templated["eval"])
            if not plan.complete:
                pipes_subprocess_client.run(command=rounds.sample_command(plan), context=context)
            metrics[f"heldout_pass{k}"] = rounds.pass_at_k(plan.output(), templated["eval"])
        metrics["eval_seconds"] = round(time.time() - started, 2)
        context.log.info(f"round {r}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
        _log_to_mlflow(exp, r, metrics)
        out = merge.output()
        return dg.Output(out, data_version=dg.DataVersion(out.key),
                         metadata={**metrics, "path": dg.MetadataValue.path(str(out.path)),
                                   "adapter_dir": dg.MetadataValue.path(str(adapter.path))})

    return [round_samples, round_accepted, round_adapter, round_eval]


def round_metrics(instance: dg.DagsterInstance, exp: Experiment, r: int, accepted: StageOutput,
                  summary: TrainingSummary, score: dict) -> dict[str, float | int]:
    """What a round reports (plotted by partition in the UI, logged to MLflow with step = round)."""
    filtered = accepted.manifest["metrics"]
    samples_meta = latest_metadata(instance, round_asset_key(exp, "round_samples"), str(r))
    adapter_meta = latest_metadata(instance, round_asset_key(exp, "round_adapter"), str(r))
    pass1 = float(score["accuracy_merged"]) if score.get("accuracy_merged") is not None else float("nan")
    history = round_history(instance, exp)[:r]
    metrics: dict[str, float | int] = {
        "round": r, "prompts": filtered["prompts"], "samples": filtered["samples"], "accepted": filtered["accepted"],
        ACCEPTANCE: filtered["acceptance_rate"], "coverage": filtered["coverage"],
        "accepted_per_prompt": filtered["accepted_per_prompt"], "duplicate_rate": filtered["duplicate_rate"],
        "truncation_rate": filtered["truncation_rate"], "mean_sample_tokens": filtered["mean_sample_tokens"],
        "tokens_trained": summary.trainable_tokens, HELD_OUT: pass1, "heldout_pass1": pass1,
        "start_pass1": summary.accuracy_before if summary.accuracy_before is not None else float("nan"),
        "generate_seconds": samples_meta["generate_seconds"].value if "generate_seconds" in samples_meta else 0.0,
        "filter_seconds": accepted.manifest["filter_seconds"],
        "pack_seconds": adapter_meta["pack_seconds"].value if "pack_seconds" in adapter_meta else 0.0,
        "train_seconds": round(summary.train_runtime, 2),
    }
    metrics["change_vs_round0"] = pass1 - (history[0]["heldout_pass1"] if history else pass1)
    metrics["change_vs_previous"] = pass1 - (history[-1]["heldout_pass1"] if history else metrics["start_pass1"])
    return metrics


def _log_to_mlflow(exp: Experiment, r: int, metrics: dict) -> None:
    """One MLflow run per loop (tagged sftdag.loop), its metrics stepped by round."""
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
            client.log_metric(run_id, key, float(value), step=r)
