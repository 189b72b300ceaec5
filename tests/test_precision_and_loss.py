"""training.precision (auto | fp32 | bf16 | fp16, the bf16/fp16 switches as aliases) resolved on
this machine, recorded and keyed; bf16 training in a CPU process; and the chunked loss
(`training.loss_chunk_tokens`), equal to the model's own loss and gradients on packed batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_helpers import REPO, TINY, make_spec, train_env
from trainer.core.config import ConfigError, TrainingConfig, experiment_from_dict
from trainer.core.keys import adapter_training_params
from trainer.training.callbacks import chunked_causal_lm_loss, chunked_loss_unsupported, final_hidden_states
from trainer.training.collate import PackedCollator, model_inputs
from trainer.training.spec import TrainingSummary
from trainer.training.train import run_training

HAS_CUDA = bool(TrainingConfig.cuda_compute_capabilities())


def torch_says_cpu_bf16() -> bool:
    """What torch itself reads of the CPU (the config decides from the CPU's flags, without torch)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") or capabilities.get("bf16"))


# -- the setting -----------------------------------------------------------------------------------

@pytest.mark.parametrize("given,expected", [
    ({}, "auto"),
    ({"precision": "fp32"}, "fp32"),
    ({"precision": "bf16"}, "bf16"),
    ({"bf16": True}, "bf16"),
    ({"fp16": True}, "fp16"),
    ({"bf16": True, "precision": "bf16"}, "bf16"),
    ({"bf16": False}, "fp32"),  # an explicit `bf16: false` kept meaning fp32
    ({"fp16": False}, "auto"),
    ({"bf16": False, "fp16": True}, "fp16"),
])
def test_precision_and_its_aliases(given, expected):
    assert TrainingConfig(**given).precision == expected


def test_auto_is_what_this_machine_has():
    assert TrainingConfig.cpu_has_bf16() == torch_says_cpu_bf16()
    on_cpu = TrainingConfig().resolved_precision("cpu")
    assert on_cpu == ("bf16" if torch_says_cpu_bf16() else "fp32")
    assert TrainingConfig().resolved_precision("mps") == "fp32"
    expected_here = ("bf16" if TrainingConfig.native_bf16("cuda") else "fp32") if HAS_CUDA else on_cpu
    assert TrainingConfig().resolved_precision() == expected_here
    # explicit precisions are taken as given where the device has them
    assert TrainingConfig(precision="fp32").resolved_precision("cpu") == "fp32"
    assert TrainingConfig(precision="bf16").resolved_precision("cpu") == "bf16"
    assert TrainingConfig(precision="fp16").resolved_precision("cuda") == "fp16"


def test_accelerate_use_cpu_means_the_cpu_decides(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert TrainingConfig.training_device_type() == "cpu"
    assert TrainingConfig().resolved_precision() == ("bf16" if torch_says_cpu_bf16() else "fp32")


@pytest.mark.parametrize("training,message", [
    ({"bf16": True, "fp16": True}, "training.bf16 and training.fp16 are both true; set training.precision instead"),
    ({"bf16": True, "precision": "fp32"},
     "training.bf16: true contradicts training.precision: fp32 (drop training.bf16; precision replaces it)"),
    ({"fp16": True, "precision": "bf16"},
     "training.fp16: true contradicts training.precision: bf16 (drop training.fp16; precision replaces it)"),
    ({"bf16": False, "precision": "bf16"},
     "training.bf16: false contradicts training.precision: bf16 (drop training.bf16; precision replaces it)"),
    ({"precision": "fp8"}, "training.precision: 'fp8' is not one of ['auto', 'fp32', 'bf16', 'fp16']"),
    ({"bf16": "yes"}, "training.bf16: 'yes' matches none of the allowed types (training.bf16: expected bool, "
                      "got str ('yes'))"),
    ({"loss_chunk_tokens": -1}, "training.loss_chunk_tokens: -1 must be >= 0 (0: the model's own loss)"),
])
def test_precision_mistakes_are_one_line(training, message):
    with pytest.raises(ConfigError) as caught:
        experiment_from_dict({"name": "x", "training": training})
    assert str(caught.value) == message and "\n" not in str(caught.value)


def test_a_precision_the_device_lacks_is_one_line():
    with pytest.raises(ConfigError, match=r"^training.precision: fp16 needs a GPU and this training runs on CPU; "
                                          r"use bf16 \(or auto\) or fp32$"):
        TrainingConfig(precision="fp16").resolved_precision("cpu")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):  # what a training process on a CPU checks
        TrainingConfig(precision="fp16").check_precision_on("cpu")
    TrainingConfig(precision="bf16").check_precision_on("cpu")
    if not HAS_CUDA:  # planning the adapter (its key) on this machine says so before any run
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            adapter_training_params(TrainingConfig(fp16=True))


def test_the_adapter_key_holds_the_resolved_precision():
    here = TrainingConfig().resolved_precision()
    auto = adapter_training_params(TrainingConfig())
    assert (auto["bf16"], auto["fp16"]) == (here == "bf16", here == "fp16")
    # auto and the precision it resolves to train the same adapter: the same key
    assert auto == adapter_training_params(TrainingConfig(precision=here))
    assert "precision" not in auto and "loss_chunk_tokens" not in auto
    # fp32 is keyed as before `precision` existed (bf16 false, fp16 false): those adapters keep their keys
    fp32 = adapter_training_params(TrainingConfig(precision="fp32"))
    assert fp32 == adapter_training_params(TrainingConfig(bf16=False))
    assert (fp32["bf16"], fp32["fp16"]) == (False, False)
    assert fp32 != adapter_training_params(TrainingConfig(precision="bf16"))
    # the loss's chunking changes memory, not the adapter
    assert fp32 == adapter_training_params(TrainingConfig(precision="fp32", loss_chunk_tokens=0))


# -- training in bf16 ------------------------------------------------------------------------------

def test_bf16_trains_in_a_cpu_process_and_auto_is_recorded(tmp_path):
    """`precision: bf16` in a single CPU process (transformers used to refuse it: "Your setup
    doesn't support bf16/gpu"), and `auto` resolved and recorded (summary, MLflow, log)."""
    from mlflow.tracking import MlflowClient

    runs = {}
    for precision in ("bf16", "fp32", "auto"):
        d = tmp_path / precision
        d.mkdir()
        spec = make_spec(d, rows=8, eval_rows=4, training={"precision": precision, "eval_strategy": "epoch",
                                                            "accuracy_rows": 0, "sample_generations": 0},
                         tracking={"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
        if precision == "bf16":  # as Dagster starts it: its own process
            proc = subprocess.run([sys.executable, "-m", "trainer.training.train", str(d / "spec.json")],
                                  cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "doesn't support bf16" not in proc.stderr
            assert "precision bf16 (training.precision bf16, on cpu)" in proc.stderr
            summary = TrainingSummary.read(spec["output_dir"])
            # its own peak resident memory: no more than the largest of this test's children, more
            # than torch alone
            import resource
            children_peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
            assert 0.2 < summary.peak_rss_gb <= round(children_peak_gb, 3) and summary.peak_gpu_gb is None
            metrics = MlflowClient(summary.mlflow_tracking_uri).get_run(summary.mlflow_run_id).data.metrics
            assert metrics["peak_rss_gb"] == summary.peak_rss_gb
        else:
            summary = run_training(spec)
        runs[precision] = summary
        params = MlflowClient(summary.mlflow_tracking_uri).get_run(summary.mlflow_run_id).data.params
        expected = TrainingConfig(precision=precision).resolved_precision()
        assert summary.precision == params["precision_resolved"] == expected
        assert params["training.precision"] == precision
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16.global_step == fp32.global_step == 2
    # the same data and seed: bf16 rounds differently (it did run in bf16) yet lands close
    assert bf16.train_loss != fp32.train_loss
    assert bf16.train_loss == pytest.approx(fp32.train_loss, rel=0.02)
    assert bf16.eval_loss == pytest.approx(fp32.eval_loss, rel=0.02)


# -- the chunked loss ------------------------------------------------------------------------------

def tiny_llama(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def packed_batch(seed: int, rows: int = 3) -> dict:
    """Packed rows of several documents of random lengths; each document's prompt (a random
    share of it) untrained, so labels are -100 at the document starts and inside rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        docs = torch.randint(2, 7, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        ids = torch.randint(0, 97, (sum(docs),), generator=g)
        labels = ids.clone()
        start = 0
        for n in docs:
            labels[start:start + int(torch.randint(0, n, (1,), generator=g))] = -100
            start += n
        out.append({"input_ids": ids.numpy(), "labels": labels.numpy(), "seq_lengths": docs})
    batch = PackedCollator(0, check_trainable=False)(out)
    batch["labels"][0, -1] = 5  # row 0 trains at least one token
    return batch


def losses_and_grads(model, batch, chunk: int, num_items=None, autocast=False):
    """(the model's own loss and gradients, the chunked loss and gradients) on `batch`."""
    inputs = model_inputs(batch, model)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                features = {k: v for k, v in inputs.items() if k != "labels"}
                out = model(**features, logits_to_keep=torch.empty(0, dtype=torch.long), output_hidden_states=True)
                assert out.logits.shape[1] == 0  # the full logits were never made
                loss = chunked_causal_lm_loss(out.hidden_states[-1], model.get_output_embeddings(),
                                              inputs["labels"], chunk, num_items)
            else:
                extra = {"num_items_in_batch": num_items} if num_items is not None else {}
                loss = model(**inputs, **extra).loss
        loss.backward()
        results.append((loss.detach().float(), [p.grad.detach().clone() for p in params]))
    return results


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_loss_is_the_models_loss_with_its_gradients(tie, chunk):
    """Full weights (every parameter's gradient, the output projection's included) over several
    packed batches: the mean, and the sum over Trainer's num_items_in_batch."""
    model = tiny_llama(tie)
    for seed in range(4):
        batch = packed_batch(seed)
        for num_items in (None, torch.tensor(11)):
            (own, own_grads), (chunked, chunked_grads) = losses_and_grads(model, batch, chunk, num_items)
            torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-6)
            for a, b in zip(chunked_grads, own_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chunked_loss_through_lora_and_new_token_rows(tie):
    """The product's LoRA model: peft's trainable new-token rows wrap the output projection (tied to
    the embeddings' rows, or its own); the gradients reach the LoRA weights and the new rows (only
    theirs) as with the model's own loss."""
    from peft import LoraConfig, get_peft_model

    rows = {"embed_tokens": [95, 96]} if tie else {"embed_tokens": [95, 96], "lm_head": [95, 96]}
    model = get_peft_model(tiny_llama(tie=tie), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", trainable_token_indices=rows))
    with torch.no_grad():  # LoRA B starts at zero: move it so every gradient path is live
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.02)
    assert type(model.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    assert chunked_loss_unsupported(model) is None
    for seed in range(3):
        batch = packed_batch(seed)
        batch["input_ids"][0, :2] = torch.tensor([95, 96])
        batch["labels"][0, 1:3] = torch.tensor([96, 95])
        (own, own_grads), (chunked, chunked_grads) = losses_and_grads(model, batch, 4)
        torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-6)
        for a, b in zip(chunked_grads, own_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert all(g.abs().sum() > 0 for g in chunked_grads)


def test_chunked_loss_in_bf16_is_as_close_to_fp32_as_the_models_own():
    model = tiny_llama(tie=True)
    for seed in range(3):
        batch = packed_batch(seed)
        (_, exact), _ = losses_and_grads(model, batch, 5)
        (own, own_grads), (chunked, chunked_grads) = losses_and_grads(model, batch, 5, autocast=True)
        torch.testing.assert_close(chunked, own, rtol=2e-3, atol=1e-4)
        for reference, a, b in zip(exact, chunked_grads, own_grads):
            own_error = float((b - reference).norm() / reference.norm())
            assert float((a - reference).norm() / reference.norm()) <= 1.5 * own_error + 1e-3


def test_chunked_loss_without_gradients():
    model = tiny_llama(tie=False).eval()
    batch = packed_batch(7)
    inputs = model_inputs(batch, model)
    with torch.no_grad():
        own = model(**inputs).loss
        features = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = model(**features, logits_to_keep=torch.empty(0, dtype=torch.long),
                       output_hidden_states=True).hidden_states[-1]
        chunked = chunked_causal_lm_loss(hidden, model.get_output_embeddings().weight, inputs["labels"], 2)
    torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", ["plain", "lora", "lora_checkpointed"])
def test_the_loss_reads_the_final_hidden_states_without_keeping_every_layers(wrap):
    """The chunked loss takes the decoder's output by a hook instead of asking the model for every
    layer's hidden states (which an evaluation would otherwise hold until the loss): the same
    tensor as the model's last hidden state, through peft and gradient checkpointing, with and
    without gradients."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(tie=True)
    if wrap != "plain":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear",
                                                 trainable_token_indices={"embed_tokens": [95, 96]}))
    if wrap == "lora_checkpointed":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    features = {k: v for k, v in model_inputs(packed_batch(3), model).items() if k != "labels"}
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            expected = model(**features, output_hidden_states=True).hidden_states[-1]
            with final_hidden_states(model) as final:
                out = model(**features, logits_to_keep=torch.empty(0, dtype=torch.long))
            assert not final.needs_all and out.hidden_states is None
            torch.testing.assert_close(final.value, expected, rtol=0, atol=0)
            assert final.value.requires_grad == grad
    # the hook is gone after the block: a later forward leaves the value as it was
    kept = final.value
    model(**features)
    assert final.value is kept
    # a model that is its own decoder has no separate output to hook: every hidden state is asked for
    assert final_hidden_states(tiny_llama(tie=True).model).needs_all


def test_models_the_chunked_loss_cannot_stand_for():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    lora_on_head = get_peft_model(tiny_llama(tie=False), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "not a bias-free Linear" in chunked_loss_unsupported(lora_on_head)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert chunked_loss_unsupported(gemma) == "the model scales its logits (final_logit_softcapping)"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_with_the_chunked_loss_is_training_with_the_models_loss(tmp_path, mode):
    """Trainer end to end (its num_items_in_batch, gradient accumulation, evaluation): the same
    losses, and the same trained weights, with loss_chunk_tokens 3 as with the model's own loss."""
    from safetensors.torch import load_file

    results = {}
    for chunk in (0, 3):
        d = tmp_path / f"chunk{chunk}"
        d.mkdir()
        spec = make_spec(d, rows=12, eval_rows=4, model={"builtin_config": {**TINY, "tie_word_embeddings": False}},
                         training={"mode": mode, "precision": "fp32", "loss_chunk_tokens": chunk,
                                   "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                   "eval_strategy": "epoch", "accuracy_rows": 0, "sample_generations": 0})
        summary = run_training(spec)
        weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
        results[chunk] = (summary, load_file(str(Path(spec["output_dir"]) / weights)))
    (own, own_weights), (chunked, chunked_weights) = results[0], results[3]
    assert chunked.global_step == own.global_step == 3
    assert chunked.train_loss == pytest.approx(own.train_loss, rel=1e-5)
    assert chunked.eval_loss == pytest.approx(own.eval_loss, rel=1e-5)
    assert chunked_weights.keys() == own_weights.keys()
    for k in own_weights:
        torch.testing.assert_close(chunked_weights[k], own_weights[k], rtol=1e-3, atol=1e-5, msg=k)
    assert json.loads((Path(chunked.output_dir) / "training_summary.json").read_text())["precision"] == "fp32"
