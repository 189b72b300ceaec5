"""Training assets: trained adapter (launched as its own process through Dagster Pipes) → merged model
(scored by `assets.evaluation`)."""


import dagster as dg

from trainer.core.config import Experiment
from trainer.training.launch import plan_adapter, plan_merge
from trainer.core.graph import NODES, STAGES
from trainer.core.store import StageOutput
from trainer.training.spec import TrainingSummary

from .graph import asset_key, ins_and_deps
from .launch import run_step

GPU_TAG = "sftdag/gpu"


def adapter_asset_key(exp: Experiment) -> dg.AssetKey:
    return asset_key(exp, "trained_adapter")


def merged_asset_key(exp: Experiment) -> dg.AssetKey:
    return asset_key(exp, "merged_model")


def _mlflow_metadata(summary: TrainingSummary) -> dict:
    meta = {}
    if summary.mlflow_run_id:
        meta["mlflow_run_id"] = dg.MetadataValue.text(summary.mlflow_run_id)
    uri = summary.mlflow_tracking_uri
    if uri:
        meta["mlflow_tracking_uri"] = dg.MetadataValue.text(uri)
        meta["mlflow_ui"] = dg.MetadataValue.text(f"mlflow ui --backend-store-uri {uri}")
    return meta


def _data(inputs: dict) -> dict[str, StageOutput]:
    """The data stages' outputs as the planner takes them: {"tokenizer": …, "<stage>/<split>": …}."""
    data = {"tokenizer": inputs["tokenizer"]}
    for node in ("packed_shards", "templated_text", "raw_dataset"):
        data.update({f"{NODES[node].stage}/{split}": out for split, out in inputs[node].items()})
    return data


def build_training_assets(exp: Experiment) -> list:
    def asset(node: str, kinds: set[str], description: str):
        # A GGUF base is converted by its own asset: training waits for it, never loads it here.
        ins, deps = ins_and_deps(exp, node, loaded=tuple(n for n in NODES[node].upstream if n != "base_model"))
        return dg.asset(key=asset_key(exp, node), ins=ins, deps=deps, group_name=exp.name, kinds=kinds,
                        code_version=STAGES[NODES[node].stage].code_version, description=description)

    @asset("trained_adapter", {"pytorch", "mlflow"},
           f"{exp.training.mode} training of `{exp.model.base}` on the packed shards (experiment `{exp.name}`); "
           "runs `trainer.training.train` in its own process.")
    def trained_adapter(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                        **inputs) -> dg.Output:
        plan = plan_adapter(exp, _data(inputs), tags={"dagster_run_id": context.run.run_id})
        cache_hit = run_step(context, pipes_subprocess_client, plan, "training")
        summary = plan.summary()
        metadata = {
            "path": dg.MetadataValue.path(str(plan.output_dir)),
            "cache_hit": dg.MetadataValue.bool(cache_hit),
            "trained_on_data_version": dg.MetadataValue.text(plan.data_version),
            "raw_version": dg.MetadataValue.text(plan.spec.tags["raw_version"]),
            "base_model": dg.MetadataValue.text(plan.base_model),
            **_mlflow_metadata(summary),
        }
        for name in ("global_step", "train_loss", "trainable_tokens", "train_runtime", "precision", "peak_rss_gb",
                     "peak_gpu_gb"):
            if getattr(summary, name) is not None:
                metadata[name] = getattr(summary, name)
        return dg.Output(plan.output(), metadata=metadata, data_version=dg.DataVersion(plan.key))

    @asset("merged_model", {"pytorch", "safetensors"},
           "The adapter folded into the base weights: a model `from_pretrained` loads alone (scored by the evaluation).")
    def merged_model(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                     **inputs) -> dg.Output:
        adapter = inputs["trained_adapter"]
        merge = plan_merge(exp, adapter, inputs["tokenizer"].path)
        cache_hit = run_step(context, pipes_subprocess_client, merge, "merging")
        summary = TrainingSummary.from_dict(adapter.manifest)
        metadata = {"path": dg.MetadataValue.path(str(merge.output_dir)), "cache_hit": dg.MetadataValue.bool(cache_hit),
                    "adapter_version": dg.MetadataValue.text(adapter.key), **_mlflow_metadata(summary)}
        return dg.Output(merge.output(), metadata=metadata, data_version=dg.DataVersion(merge.key))

    return [trained_adapter, merged_model]
