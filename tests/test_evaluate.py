"""Held-out generation stops at the template's end-of-turn text, also when that text is several
tokens of the tokenizer (a marker the tokenizer lacks as a special token)."""

from __future__ import annotations

import pytest
import torch

from trainer.core.config import TokenizerConfig
from trainer.training.evaluate import generate
from trainer.training.generate import stop_tokens_and_strings
from trainer.data.tokenizer_loading import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer(TokenizerConfig(path="builtin:tiny"))
    t.add_special_tokens({"pad_token": "<|pad|>"})
    return t


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_single_token_stops_are_ids_and_text_markers_are_strings(tok):
    ids, strings = stop_tokens_and_strings(tok, ["</s>", "<|im_end|>", "", None, 7])
    assert ids == sorted({tok.eos_token_id, 7})
    assert strings == ["<|im_end|>"] and len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1


def test_generation_is_cut_at_a_multi_token_stop_string(tok, model):
    prompts = ["add 12 and 30:", "reverse abc:"]
    free = generate(model, tok, prompts, max_new_tokens=12)
    # A stop string made of several tokens the random model does produce: the first output is cut
    # right before it, and generation stops there (nothing after it is returned).
    new_ids = tok(free[0], add_special_tokens=False)["input_ids"]
    assert len(new_ids) >= 6, free
    stop = tok.decode(new_ids[3:5])
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) > 1
    cut = generate(model, tok, prompts, max_new_tokens=12, stop_tokens=[stop])
    assert cut[0] == free[0][: free[0].find(stop)]
    assert stop not in cut[1] and free[1].startswith(cut[1])


def test_merged_generation_config_stops_at_a_multi_token_end_of_turn(tok, model, tmp_path):
    from transformers import GenerationConfig

    from trainer.training.merge import _generation_config

    config = _generation_config(model, tok, "<|im_end|>")
    assert config.eos_token_id == [tok.eos_token_id] and config.stop_strings == ["<|im_end|>"]
    config.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).stop_strings == ["<|im_end|>"]
    single = _generation_config(model, tok, "</s>")
    assert single.eos_token_id == [tok.eos_token_id] and not single.stop_strings
