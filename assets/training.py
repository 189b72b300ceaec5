"""Training assets: trained adapter (launched as its own process through Dagster Pipes) → merged model."""


import dagster as dg

from trainer.core.config import Experiment
from trainer.training.launch import held_out_file, merge_command, plan_adapter, plan_merge, training_command
from trainer.core.store import CODE_VERSIONS, StageOutput
from trainer.training.spec import TrainingSummary

from .data import data_asset_key, tokenizer_asset_key
from .models import base_model_asset_key

GPU_TAG = "sftdag/gpu"


def adapter_asset_key(exp: Experiment) -> dg.AssetKey:
    return dg.AssetKey([exp.name, "trained_adapter"])


def merged_asset_key(exp: Experiment) -> dg.AssetKey:
    return dg.AssetKey([exp.name, "merged_model"])


def _mlflow_metadata(summary: TrainingSummary) -> dict:
    meta = {}
    if summary.mlflow_run_id:
        meta["mlflow_run_id"] = dg.MetadataValue.text(summary.mlflow_run_id)
    uri = summary.mlflow_tracking_uri
    if uri:
        meta["mlflow_tracking_uri"] = dg.MetadataValue.text(uri)
        meta["mlflow_ui"] = dg.MetadataValue.text(f"mlflow ui --backend-store-uri {uri}")
    return meta


def _data_ins(exp: Experiment) -> dict[str, dg.AssetIn]:
    """What training reads of the data group: shards, held-out prompts, tokenizer, raw version."""
    group = exp.data_group
    return {"packed": dg.AssetIn(data_asset_key(group, "packed")),
            "templated": dg.AssetIn(data_asset_key(group, "templated")),
            "raw": dg.AssetIn(data_asset_key(group, "raw")),
            "tok": dg.AssetIn(tokenizer_asset_key(group))}


def _data(packed: dict, templated: dict, raw: dict, tok: StageOutput) -> dict[str, StageOutput]:
    data = {"tokenizer": tok}
    for stage, outputs in (("packed", packed), ("templated", templated), ("raw", raw)):
        data.update({f"{stage}/{split}": out for split, out in outputs.items()})
    return data


def build_training_assets(exp: Experiment) -> list:
    group = exp.data_group

    base_model = base_model_asset_key(exp)

    @dg.asset(key=adapter_asset_key(exp), ins=_data_ins(exp), group_name=exp.name,
              deps=[base_model] if base_model is not None else [],
              code_version=CODE_VERSIONS["adapter"], kinds={"pytorch", "mlflow"},
              description=f"{exp.training.mode} training of `{exp.model.base}` on the packed shards "
                          f"(experiment `{exp.name}`); runs `trainer.training.train` in its own process.")
    def trained_adapter(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                        packed: dict, templated: dict, raw: dict, tok: StageOutput) -> dg.Output:
        plan = plan_adapter(exp, _data(packed, templated, raw, tok), tags={"dagster_run_id": context.run.run_id})
        cache_hit = plan.complete
        if cache_hit:
            context.log.info(f"adapter {plan.key} already trained at {plan.output_dir}: not retraining")
        else:
            command = training_command(exp, plan.spec_path)
            context.log.info("launching: " + " ".join(command))
            pipes_subprocess_client.run(command=command, context=context)
            if not plan.complete:
                raise dg.Failure(f"training exited without writing {plan.output_dir}")
        summary = plan.summary()
        metadata = {
            "path": dg.MetadataValue.path(str(plan.output_dir)),
            "cache_hit": dg.MetadataValue.bool(cache_hit),
            "trained_on_data_version": dg.MetadataValue.text(plan.data_version),
            "raw_version": dg.MetadataValue.text(plan.spec.tags["raw_version"]),
            "base_model": dg.MetadataValue.text(plan.base_model),
            **_mlflow_metadata(summary),
        }
        for name in ("global_step", "train_loss", "accuracy_before", "accuracy_after", "trainable_tokens",
                     "train_runtime"):
            if getattr(summary, name) is not None:
                metadata[name] = getattr(summary, name)
        return dg.Output(plan.output(), metadata=metadata, data_version=dg.DataVersion(plan.key))

    @dg.asset(key=merged_asset_key(exp), group_name=exp.name, code_version=CODE_VERSIONS["merged"],
              ins={"adapter": dg.AssetIn(adapter_asset_key(exp)),
                   "templated": dg.AssetIn(data_asset_key(group, "templated")),
                   "tok": dg.AssetIn(tokenizer_asset_key(group))},
              kinds={"pytorch", "safetensors"},
              description="The adapter folded into the base weights: a model `from_pretrained` loads.")
    def merged_model(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                     adapter: StageOutput, templated: dict, tok: StageOutput) -> dg.Output:
        merge = plan_merge(exp, adapter, tok.path, held_out_file(templated.get("eval")))
        if not merge.complete:  # merging and scoring load models: their own process
            pipes_subprocess_client.run(command=merge_command(merge), context=context)
            if not merge.complete:
                raise dg.Failure(f"merging exited without writing {merge.score_path}")
        result = merge.result()
        summary = TrainingSummary.from_dict(adapter.manifest)
        metadata = {"path": dg.MetadataValue.path(str(merge.output_dir)),
                    "adapter_version": dg.MetadataValue.text(adapter.key), **_mlflow_metadata(summary)}
        if summary.accuracy_before is not None:
            metadata["accuracy_base"] = float(summary.accuracy_before)
        if result.get("accuracy_merged") is not None:
            metadata["accuracy_merged"] = float(result["accuracy_merged"])
            metadata["scored_rows"] = int(result["scored_rows"])
            _log_merged_accuracy(summary, result["accuracy_merged"])
            context.log.info(f"held-out exact match: base {summary.accuracy_before} → merged "
                             f"{result['accuracy_merged']}")
        return dg.Output(merge.output(), metadata=metadata, data_version=dg.DataVersion(merge.key))

    return [trained_adapter, merged_model]


def _log_merged_accuracy(summary: TrainingSummary, accuracy: float) -> None:
    if not (summary.mlflow_run_id and summary.mlflow_tracking_uri):
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=summary.mlflow_tracking_uri).log_metric(summary.mlflow_run_id, "accuracy_merged",
                                                                       float(accuracy))
