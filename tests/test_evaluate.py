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


# -- held-out loss ----------------------------------------------------------------------------------

LOSS_ROWS = [
    {"prompt": "<|im_start|>user\nadd 12 and 30<|im_end|>\n<|im_start|>assistant\n", "reference": "42",
     "source": "a.jsonl", "task": "add", "answer_end": "<|im_end|>"},
    {"prompt": "reverse abc\nAnswer:", "reference": "cba", "source": "b.jsonl", "task": "reverse",
     "answer_end": "</s>"},
    {"prompt": "<|im_start|>system\nBe brief and exact, always.<|im_end|>\n<|im_start|>user\nupper hello world"
               "<|im_end|>\n<|im_start|>assistant\n", "reference": "HELLO WORLD", "source": "a.jsonl", "task": "upper"},
    {"prompt": "q", "reference": "a much longer reference answer than the others, to pad the rest", "source": "b.jsonl",
     "task": "add"},
    {"prompt": "convert 3 km to m\nAnswer:", "reference": "3000", "source": "c.jsonl", "task": "convert",
     "answer_end": ""},
]


def direct_loss(model, tok, rows, stop):
    """Row by row, the model's own loss with the prompt masked: (summed nats, reference tokens) per row."""
    out = []
    for row in rows:
        end = row["answer_end"] if "answer_end" in row else stop
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(row["reference"] + end, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            mean = model(input_ids=ids, labels=labels).loss.item()
        out.append((mean * len(answer), len(answer)))
    return out


def test_held_out_loss_is_the_models_own_loss_of_the_references(tok, model):
    from trainer.training.evaluate import held_out_loss

    per_row = direct_loss(model, tok, LOSS_ROWS, "<|im_end|>")
    assert len({n for _, n in per_row}) >= 3  # rows of different lengths: batches are padded
    total = sum(s for s, _ in per_row)
    tokens = sum(n for _, n in per_row)
    for batch_size in (1, 2, 8):
        got = held_out_loss(model, tok, LOSS_ROWS, "<|im_end|>", batch_size=batch_size)
        assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)
        assert (got["tokens"], got["rows"]) == (tokens, len(LOSS_ROWS))
        for group, field in (("by_source", "source"), ("by_task", "task")):
            labels = sorted({r[field] for r in LOSS_ROWS})
            assert sorted(got[group]) == labels
            for label in labels:
                mine = [p for p, r in zip(per_row, LOSS_ROWS) if r[field] == label]
                figures = got[group][label]
                assert figures["rows"] == len(mine) and figures["tokens"] == sum(n for _, n in mine)
                assert figures["loss"] == pytest.approx(sum(s for s, _ in mine) / figures["tokens"], rel=1e-5)
            # the groups' token-weighted losses add up to the whole
            assert sum(f["loss"] * f["tokens"] for f in got[group].values()) == pytest.approx(total, rel=1e-5)
            assert sum(f["tokens"] for f in got[group].values()) == tokens
            assert sum(f["rows"] for f in got[group].values()) == len(LOSS_ROWS)
    # a row without `answer_end` ends with the stop token given, else the tokenizer's eos
    eos_ended = held_out_loss(model, tok, LOSS_ROWS[3:4], None)
    (s, n), = direct_loss(model, tok, LOSS_ROWS[3:4], tok.eos_token)
    assert eos_ended["loss"] == pytest.approx(s / n, rel=1e-5) and eos_ended["tokens"] == n
    assert held_out_loss(model, tok, LOSS_ROWS[3:4], "<|im_end|>")["tokens"] > n  # <|im_end|> is several tokens
    # one source (or task): no breakdown; no rows: no loss
    single = held_out_loss(model, tok, LOSS_ROWS[:1], None)
    assert "by_source" not in single and "by_task" not in single
    assert held_out_loss(model, tok, [], None) == {"loss": None, "tokens": 0, "rows": 0}


def test_held_out_loss_without_a_pad_token_and_of_a_saved_model(tok, model, tmp_path):
    import json

    from trainer.training.evaluate import held_out_loss, held_out_loss_of, load_held_out

    unpadded = load_tokenizer(TokenizerConfig(path="builtin:tiny"))
    assert unpadded.pad_token_id is None or unpadded.pad_token_id != tok.pad_token_id
    want = held_out_loss(model, tok, LOSS_ROWS, "<|im_end|>", batch_size=4)
    assert held_out_loss(model, unpadded, LOSS_ROWS, "<|im_end|>", batch_size=4)["loss"] == pytest.approx(want["loss"])
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in LOSS_ROWS))
    got = held_out_loss_of(tmp_path / "model", path, ["", "<|im_end|>"], rows_limit=3)
    expected = held_out_loss(model, tok, load_held_out(path, limit=3), "<|im_end|>")
    assert (got["rows"], got["tokens"]) == (3, expected["tokens"])
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got["by_source"] == {k: pytest.approx(v) for k, v in expected["by_source"].items()}
