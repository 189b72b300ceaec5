"""SentencePiece-style tokenizers built here (no hub): a BPE with byte fallback trained on a small
corpus, saved the three ways such tokenizers reach users.

- "sp-prepend":  a raw `tokenizer.json` whose normalizer prepends "▁" (legacy Llama-2/Mistral files).
- "sp-legacy":   loaded as transformers' LlamaTokenizer with legacy=True (Metaspace, prepend always).
- "sp-first":    LlamaTokenizer with legacy=False (Metaspace, prepend only at the start).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]
CORPUS = [
    "Hello world, how are you? I am fine, thank you. The capital of France is Paris.",
    "What is 2 + 2? It is 4. And 10 times that? 40. Say it in words, please: Forty.",
    "You are a helpful assistant. Answer briefly and precisely, without extra words.",
    "Translate to French: good morning -> bonjour. Café, naïve, über, 東京.",
    string.printable,
] * 20
FAMILIES = ("sp-prepend", "sp-legacy", "sp-first")


def _train() -> dict:
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                                        initial_alphabet=["▁"], show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte fallback: every byte has a token, so nothing becomes <unk>
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return spec


def build(family: str, out_dir: Path) -> Path:
    """Write the tokenizer of `family` into out_dir; returns the path to load (dir or file)."""
    spec = _train()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    if family == "sp-prepend":
        (out_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
             "unk_token": "<unk>"}))
        return out_dir
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "legacy": family == "sp-legacy", "add_bos_token": True, "add_eos_token": False}))
    return out_dir
