"""training.gradient_checkpointing (on by default): each layer's activations recomputed in the
backward instead of kept. It changes memory and time, never what is trained: the same losses and
weights with and without it, so it stays out of the adapter key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train_helpers import TINY, make_spec
from trainer.core.config import TrainingConfig
from trainer.core.keys import adapter_training_params
from trainer.training.train import run_training


@pytest.mark.parametrize("mode,precision", [("lora", "fp32"), ("full", "fp32"), ("lora", "auto")])
def test_checkpointing_trains_the_same_weights(tmp_path, monkeypatch, mode, precision):
    """LoRA dropout on (checkpointing must replay the same dropout masks), gradient accumulation,
    packed rows, an evaluation: the run with checkpointing is the run without it, though each
    layer's forward ran again in every training backward."""
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaMLP

    # Counted inside the layer (its MLP): the checkpointed layer's own forward must stay transformers'.
    layer_forwards = [0]
    forward = LlamaMLP.forward

    def counted(self, *args, **kwargs):
        layer_forwards[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    results, forwards = {}, {}
    for checkpointing in (False, True):
        layer_forwards[0] = 0
        d = tmp_path / f"checkpointing-{checkpointing}"
        d.mkdir()
        spec = make_spec(d, rows=12, eval_rows=4, model={"builtin_config": {**TINY, "tie_word_embeddings": False}},
                         training={"mode": mode, "precision": precision, "gradient_checkpointing": checkpointing,
                                   "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                   "eval_strategy": "epoch", "accuracy_rows": 0, "sample_generations": 0,
                                   "lora": {"dropout": 0.1}})
        summary = run_training(spec)
        weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
        results[checkpointing] = (summary, load_file(str(Path(spec["output_dir"]) / weights)))
        forwards[checkpointing] = layer_forwards[0]
    (plain, plain_weights), (recomputed, recomputed_weights) = results[False], results[True]
    assert recomputed.global_step == plain.global_step == 3
    # 6 training micro-batches (12 rows / 2), their forwards recomputed in the backward; the
    # evaluation's forward (no backward) once either way
    trained_forwards = 6 * TINY["num_hidden_layers"]
    assert forwards[True] - forwards[False] == trained_forwards and forwards[False] > trained_forwards
    assert recomputed.train_loss == pytest.approx(plain.train_loss, rel=1e-6)
    assert recomputed.eval_loss == pytest.approx(plain.eval_loss, rel=1e-6)
    assert recomputed_weights.keys() == plain_weights.keys()
    changed = 0
    for k in plain_weights:
        torch.testing.assert_close(recomputed_weights[k], plain_weights[k], rtol=1e-5, atol=1e-7, msg=k)
        changed += "lora_B" in k and bool(plain_weights[k].abs().max() > 0)
    assert mode == "full" or changed  # it trained


def test_checkpointing_is_on_by_default_and_out_of_the_adapter_key():
    assert TrainingConfig().gradient_checkpointing is True
    assert adapter_training_params(TrainingConfig(gradient_checkpointing=True)) == \
        adapter_training_params(TrainingConfig(gradient_checkpointing=False))
    # keyed as its old default (false), so adapters trained before keep their keys
    assert adapter_training_params(TrainingConfig())["gradient_checkpointing"] is False
