"""Training assets through a real Dagster instance: Pipes-launched training, MLflow, merge."""


import dagster as dg
import pytest
import torch

from assets.data import data_asset_key
from assets.training import GPU_TAG, adapter_asset_key, merged_asset_key
from pipelines.cli import materialize_experiment
from pipelines.definitions import build_definitions, train_job_name
from trainer.training.evaluate import exact_match, generate, load_held_out
from trainer.training.launch import plan_adapter, plan_merge
from assets.evaluation import evaluation_asset_key

from .conftest import small_rows


TINY_MODEL = {"base": "builtin:tiny-llama",
              "builtin_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "num_key_value_heads": 2, "intermediate_size": 64,
                                 "max_position_embeddings": 256}}
TINY_TRAINING = {"mode": "lora", "max_steps": 4, "per_device_train_batch_size": 2, "save_steps": 2,
                 "logging_steps": 1, "learning_rate": 0.01, "accuracy_rows": 6, "max_new_tokens": 4,
                 "sample_generations": 2, "lora": {"r": 4, "alpha": 8}}


@pytest.mark.slow
def test_materialize_training_assets_end_to_end(make_experiment, instance):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exp = make_experiment(name="tiny_train", rows=small_rows(80),
                          data={"name": "tiny_data", "eval": {"fraction": 0.1},
                                "checks": {"min_packing_efficiency": 0.5}},
                          model=TINY_MODEL, training=TINY_TRAINING)
    result = materialize_experiment(exp, "model", instance=instance)
    assert result.success

    adapter = instance.get_latest_materialization_event(adapter_asset_key(exp)).asset_materialization
    packed = instance.get_latest_materialization_event(data_asset_key("tiny_data", "packed")).asset_materialization
    meta = adapter.metadata
    assert meta["global_step"].value == 4 and meta["cache_hit"].value is False
    assert meta["trained_on_data_version"].value == packed.tags["dagster/data_version"]
    # The UI shows what the training process measured and recorded (held-out answers are the
    # evaluation's to score).
    summary = plan_adapter(exp).summary()
    assert "accuracy_before" not in meta and "accuracy_after" not in meta
    assert meta["train_loss"].value == summary.train_loss and meta["path"].value == summary.output_dir

    # The MLflow run names the Dagster run and the shard version; its contents read back.
    client = MlflowClient(tracking_uri=meta["mlflow_tracking_uri"].value)
    run = client.get_run(meta["mlflow_run_id"].value)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_loss"] == pytest.approx(summary.train_loss)
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["data_version"] == packed.tags["dagster/data_version"]
    assert float(run.data.params["training.learning_rate"]) == 0.01
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")][:2] == [1, 2]

    plan = plan_adapter(exp)
    merged_dir = plan_merge(exp, plan.output(), plan.spec.tokenizer_dir).output_dir
    merged = instance.get_latest_materialization_event(merged_asset_key(exp)).asset_materialization
    assert merged.metadata["path"].value == str(merged_dir)
    # The merged model on disk, loaded alone, is the trained adapter on its base model: same logits
    # and greedy answers on the held-out prompts (which the adapter changed), and the accuracy the
    # evaluation shows (in the UI and MLflow) is that of those answers; its "before" is the base's.
    from peft import PeftModel

    from trainer.training.base_model import load_model, resize_for_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    base = load_model(plan.base_model, exp.model)
    resize_for_tokenizer(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, str(plan.output_dir)).eval()
    rows = load_held_out(plan.spec.held_out)[:TINY_TRAINING["accuracy_rows"]]
    assert len(rows) == TINY_TRAINING["accuracy_rows"]
    prompts = [r["prompt"] for r in rows]
    stops = [plan.summary().eot_token, tokenizer.eos_token]
    ids = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        merged_logits, adapter_logits = model(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            base_logits = adapted(ids).logits
        generations = generate(model, tokenizer, prompts, TINY_TRAINING["max_new_tokens"], stop_tokens=stops)
        assert generations == generate(adapted, tokenizer, prompts, TINY_TRAINING["max_new_tokens"],
                                       stop_tokens=stops)
        with adapted.disable_adapter():
            base_generations = generate(adapted, tokenizer, prompts, TINY_TRAINING["max_new_tokens"],
                                        stop_tokens=stops)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert (base_logits - adapter_logits).abs().max() > 1e-3
    accuracy = exact_match(generations, [r["reference"] for r in rows])
    base_accuracy = exact_match(base_generations, [r["reference"] for r in rows])
    evaluation = instance.get_latest_materialization_event(evaluation_asset_key(exp)).asset_materialization
    assert evaluation.metadata["accuracy_merged"].value == accuracy
    assert evaluation.metadata["accuracy_base"].value == base_accuracy  # the base, by the same scorer
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["exact"] == accuracy and metrics["exact_base"] == base_accuracy
    assert metrics["held_out_loss"] == evaluation.metadata["held_out_loss"].value
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {
        "evaluation/answers.jsonl", "evaluation/scores.png"}

    # Materializing again reuses the completed adapter version: nothing is retrained.
    again = materialize_experiment(exp, "model", instance=instance)
    assert again.success
    second = instance.get_latest_materialization_event(adapter_asset_key(exp)).asset_materialization
    assert second.metadata["cache_hit"].value is True
    assert second.tags["dagster/data_version"] == adapter.tags["dagster/data_version"]
    assert second.metadata["mlflow_run_id"].value == meta["mlflow_run_id"].value
    assert second.metadata["global_step"].value == 4


@pytest.mark.slow
def test_evaluation_and_reporting_settings_never_retrain(make_experiment, instance):
    import dataclasses

    exp = make_experiment(name="tiny_eval", rows=small_rows(40),
                          data={"name": "tiny_eval_data", "eval": {"fraction": 0.2},
                                "checks": {"min_packing_efficiency": 0.5}},
                          model=TINY_MODEL, training={**TINY_TRAINING, "max_steps": 2})
    assert materialize_experiment(exp, "model", instance=instance).success
    first = instance.get_latest_materialization_event(adapter_asset_key(exp)).asset_materialization

    def changed(**training):
        return dataclasses.replace(exp, training=dataclasses.replace(exp.training, **training))

    # Held-out rows scored, samples logged, logging, evaluation and checkpoint cadence, tracking.
    reporting = dataclasses.replace(
        changed(accuracy_rows=3, sample_generations=1, logging_steps=2, eval_steps=5, save_steps=7,
                max_new_tokens=2, gpu=True),
        tracking=dataclasses.replace(exp.tracking, experiment_name="elsewhere"))
    assert plan_adapter(reporting).key == plan_adapter(exp).key
    assert plan_adapter(changed(learning_rate=0.02)).key != plan_adapter(exp).key  # a training setting does
    assert materialize_experiment(reporting, "model", instance=instance).success
    again = instance.get_latest_materialization_event(adapter_asset_key(exp)).asset_materialization
    assert again.metadata["cache_hit"].value is True
    assert again.tags["dagster/data_version"] == first.tags["dagster/data_version"]
    # ...while the merged model is scored again on the rows now asked for.
    evaluation = instance.get_latest_materialization_event(evaluation_asset_key(exp)).asset_materialization
    assert evaluation.metadata["scored_rows"].value == 3


def test_gpu_runs_are_tagged_and_limited_to_one(make_experiment, instance):
    gpu = make_experiment(name="on_gpu", training={"gpu": True})
    cpu = make_experiment(name="on_cpu")
    defs = build_definitions([gpu, cpu])
    assert defs.resolve_job_def(train_job_name(gpu)).tags.get(GPU_TAG) == "true"
    assert GPU_TAG not in defs.resolve_job_def(train_job_name(cpu)).tags
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {"key": GPU_TAG, "value": "true", "limit": 1} in limits
