"""Merging: the merged model computes what base + adapter computes, and stands alone."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import full_run, lora_run
from trainer.training.evaluate import exact_match, generate, load_held_out
from trainer.training.generate import stop_tokens_and_strings
from trainer.training.merge import merge_adapter


@pytest.mark.slow
def test_merged_equals_adapter_and_loads_alone(tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, summary = lora_run(tmp_path_factory)
    adapter_dir = Path(spec["output_dir"])
    out = tmp_path_factory.mktemp("merge") / "merged"
    merge_adapter(adapter_dir, summary.base_model_path, spec["tokenizer_dir"], out, summary.eot_token)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert not list(out.parent.glob(".tmp-*"))

    tok = AutoTokenizer.from_pretrained(str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(summary.base_model_path)
    base.resize_token_embeddings(len(tok))
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([[2, 30, 5, 6, 31, 30, 7, 8, 9, 31]])
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        m = merged(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)
    # The adapter changed the model, so the comparison means something.
    with torch.no_grad(), with_adapter.disable_adapter():
        assert (with_adapter(input_ids=ids).logits - a).abs().max() > 1e-4

    # Generation config stops at eos and at the template's end-of-turn token.
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot in merged.generation_config.eos_token_id and tok.eos_token_id in merged.generation_config.eos_token_id
    # Plain `generate` on the merged model (no peft) continues as base + adapter does.
    gen = merged.generate(input_ids=ids[:, :4], max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        assert torch.equal(gen, with_adapter.generate(input_ids=ids[:, :4], max_new_tokens=5, do_sample=False,
                                                      generation_config=merged.generation_config))
    # Same greedy generations through the merged model and the adapter.
    rows = load_held_out(spec["held_out"])
    prompts = [r["prompt"] for r in rows]
    g_merged = generate(merged, tok, prompts, 4, stop_tokens=["<|im_end|>"])
    g_adapter = generate(with_adapter, tok, prompts, 4, stop_tokens=["<|im_end|>"])
    assert g_merged == g_adapter
    # ...and as the training process answered them at its end (its final sample table in MLflow,
    # generated in the precision it trained in).
    final = _final_samples(summary)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if summary.precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        g_trained = generate(with_adapter, tok, [row[1] for row in final], 4, stop_tokens=["<|im_end|>"])
    assert [row[1] for row in final] == prompts[:len(final)] and len(final) == 2
    assert [row[2] for row in final] == g_trained

    # A second merge into the same place is a no-op.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    merge_adapter(adapter_dir, summary.base_model_path, spec["tokenizer_dir"], out, "<|im_end|>")
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def _final_samples(summary) -> list[list]:
    """The rows (step, prompt, generation, reference) of the training's final sample table in MLflow."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.mlflow_tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(client.download_artifacts(summary.mlflow_run_id, "samples/final.json", tmp))
        return json.loads(path.read_text())["data"]


@pytest.mark.slow
def test_merge_full_model_copies_it(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    spec, summary = full_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("merge_full") / "merged"
    merge_adapter(spec["output_dir"], summary.base_model_path, spec["tokenizer_dir"], out, "<|im_end|>")
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    trained = AutoModelForCausalLM.from_pretrained(spec["output_dir"])
    for (n1, p1), (n2, p2) in zip(merged.named_parameters(), trained.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert 31 in merged.generation_config.eos_token_id
    info = json.loads((out / "sftdag_merge.json").read_text())
    assert info["kind"] == "full"


def test_generate_left_pads_and_stops(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.train_helpers import make_tokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "tok")))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=64)).eval()
    # Only ordinary words may be generated: no eos/special token cuts the output short.
    banned = torch.zeros(len(tok))
    banned[:4] = banned[30:] = -1e4
    model.lm_head.register_forward_hook(lambda module, args, out: out + banned)
    prompts = ["<s> alpha", "<s> one two three four five alpha beta"]
    one_by_one = [generate(model, tok, [p], 3)[0] for p in prompts]
    assert all(len(g.split()) == 3 for g in one_by_one), one_by_one
    # Left padding does not change greedy output.
    assert generate(model, tok, prompts, 3, batch_size=2) == one_by_one
    # A stop token ends the generation and is not part of it: stop at the 2nd generated word.
    second = one_by_one[0].split()[1]
    assert generate(model, tok, prompts[:1], 3, stop_tokens=[second]) == [one_by_one[0].split()[0]]
    assert stop_tokens_and_strings(tok, ["<|im_end|>"]) == (
        sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}), [])
    # Text that is several tokens is a stop string (tests/test_evaluate.py generates with one).
    assert stop_tokens_and_strings(tok, ["alpha beta"]) == ([tok.eos_token_id], ["alpha beta"])
    assert exact_match([" a ", "b"], ["a", "c"]) == 0.5
