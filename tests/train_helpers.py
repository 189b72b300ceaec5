"""Helpers for the training tests: a tokenizer trained in the test, packed shards of random
documents, tiny model configs and run specs. No downloads, no shared data."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four", "five", "six", "plus", "minus",
         "equals", "answer", "question", "what", "is", "the", "of", "and", "a", "b", "c", "x", "y", "z"]
ADDED = ["<|im_start|>", "<|im_end|>"]

# Tiny Llama for fast tests (passed as model.builtin_config).
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 256}


def make_tokenizer(directory: Path, added: list[str] | None = ADDED) -> Path:
    """A WordLevel tokenizer (ids: <pad> 0, <unk> 1, <s> 2, </s> 3, words) plus `added` special
    tokens appended after the base vocabulary, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    # What the data stage's template set-up stores beside the tokenizer.
    from trainer.core.template_setup import TemplateSetup

    setup = TemplateSetup(chat_template=None, added_tokens=list(added or []), eot_token=added[1] if added else None,
                          pad_token="<pad>")
    (directory / "template_setup.json").write_text(json.dumps(setup.to_dict()))
    return directory


def base_vocab() -> int:
    return 4 + len(dict.fromkeys(WORDS))


def random_documents(n: int, vocab: int, seed: int = 0, min_len: int = 3, max_len: int = 12,
                     token_ids: list[int] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) documents: first token −100, the second half trainable."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.choice(token_ids) if token_ids else rng.randrange(4, vocab) for _ in range(length)]
        cut = max(1, length // 2)
        labels = [-100] * cut + ids[cut:]
        docs.append((ids, labels))
    return docs


def pack_rows(docs: list[tuple[list[int], list[int]]], docs_per_row: int) -> pa.Table:
    ids_col, lab_col, seq_col = [], [], []
    for start in range(0, len(docs), docs_per_row):
        group = docs[start:start + docs_per_row]
        ids_col.append([t for d in group for t in d[0]])
        lab_col.append([t for d in group for t in d[1]])
        seq_col.append([len(d[0]) for d in group])
    return pa.table({
        "input_ids": pa.array(ids_col, type=pa.list_(pa.int32())),
        "labels": pa.array(lab_col, type=pa.list_(pa.int32())),
        "seq_lengths": pa.array(seq_col, type=pa.list_(pa.int32())),
    })


def write_shards(directory: Path, table: pa.Table, rows_per_shard: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        part = table.slice(start, rows_per_shard)
        with pa.OSFile(str(directory / f"shard-{index:05d}.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, part.schema) as writer:
            writer.write_table(part)
    (directory / "manifest.json").write_text(json.dumps({"stage": "packed", "rows": table.num_rows}))
    return directory


def make_shards(directory: Path, rows: int, docs_per_row: int = 3, seed: int = 0, vocab: int | None = None,
                rows_per_shard: int = 8, token_ids: list[int] | None = None) -> Path:
    # Token ids 4.. cover the added special tokens too, so their embedding rows get gradients.
    docs = random_documents(rows * docs_per_row, vocab or base_vocab() + len(ADDED), seed=seed, token_ids=token_ids)
    return write_shards(directory, pack_rows(docs, docs_per_row), rows_per_shard)


def write_held_out(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_spec(tmp: Path, *, rows: int = 16, training: dict | None = None, model: dict | None = None,
              eval_rows: int = 0, held_out: list[dict] | None = None, tags: dict | None = None,
              name: str = "t", added: list[str] | None = ADDED, tracking: dict | None = None,
              seed: int = 0, output: str = "out", token_ids: list[int] | None = None) -> dict[str, Any]:
    """A run spec over fresh shards and a fresh tokenizer in `tmp`; written to tmp/spec.json."""
    tok_dir = tmp / "tokenizer"
    if not tok_dir.exists():
        make_tokenizer(tok_dir, added)
    train_dir = tmp / "train"
    if not train_dir.exists():
        make_shards(train_dir, rows, seed=seed, token_ids=token_ids)
    eval_dir = None
    if eval_rows:
        eval_dir = tmp / "eval"
        if not eval_dir.exists():
            make_shards(eval_dir, eval_rows, seed=seed + 1, token_ids=token_ids)
    held_path = write_held_out(tmp / "held_out.jsonl", held_out) if held_out else None
    tr = {"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
          "logging_steps": 1, "save_strategy": "no", "lr_scheduler_type": "constant",
          "sample_generations": 2, "max_new_tokens": 4, "accuracy_rows": 4,
          "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    for k, v in (training or {}).items():
        if k == "lora":
            tr["lora"] = {**tr["lora"], **v}
        else:
            tr[k] = v
    experiment = {
        "name": name, "store": str(tmp / "store"), "base_dir": str(tmp),
        "model": {"base": "builtin:tiny-llama", "builtin_config": dict(TINY), **(model or {})},
        "training": tr,
        "tracking": tracking or {},
    }
    spec = {
        "experiment": experiment,
        "train_shards": str(train_dir),
        "eval_shards": str(eval_dir) if eval_dir else None,
        "tokenizer_dir": str(tok_dir),
        "held_out": str(held_path) if held_path else None,
        "output_dir": str(tmp / output),
        "tags": tags or {"dagster_run_id": "run-1", "data_version": "dv-1"},
    }
    (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


def held_out_rows(n: int = 4) -> list[dict]:
    prompts = ["<s> <|im_start|> what is one plus two <|im_end|> <|im_start|>",
               "<s> <|im_start|> what is two plus two <|im_end|> <|im_start|>",
               "<s> <|im_start|> question alpha <|im_end|> <|im_start|>",
               "<s> <|im_start|> question beta <|im_end|> <|im_start|>"]
    refs = ["three", "four", "beta", "gamma"]
    return [{"prompt": prompts[i % 4], "reference": refs[i % 4]} for i in range(n)]


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def pipes_env(directory: Path, asset_key: str = "adapter") -> tuple[dict[str, str], Path]:
    """Environment that makes a process a Dagster Pipes process (as PipesSubprocessClient would),
    with its messages written to a file: (env vars, messages file)."""
    from dagster_pipes import encode_param

    directory.mkdir(parents=True, exist_ok=True)
    context = {"asset_keys": [asset_key], "code_version_by_asset_key": {asset_key: None},
               "provenance_by_asset_key": {asset_key: None}, "partition_key": None, "partition_key_range": None,
               "partition_time_window": None, "run_id": "pipes-run", "job_name": None, "retry_number": 0,
               "extras": {}}
    context_path = directory / "context.json"
    context_path.write_text(json.dumps(context))
    messages = directory / "messages.jsonl"
    return {"DAGSTER_PIPES_CONTEXT": encode_param({"path": str(context_path)}),
            "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(messages)})}, messages


def read_pipes_messages(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    env.pop("DAGSTER_PIPES_MESSAGES", None)
    env.update(extra or {})
    return env


# Shared training runs: one per key per test session, for the tests that only read their outputs.
_RUNS: dict[str, tuple[dict, dict]] = {}


def _run_training(spec):
    from trainer.training.train import run_training

    return run_training(spec)


def shared_run(tmp_path_factory, key: str, **kwargs) -> tuple[dict, dict]:
    """One training run per key per session, shared by the tests that only read its outputs."""
    if key not in _RUNS:
        tmp = tmp_path_factory.mktemp(key)
        spec = make_spec(tmp, **kwargs)
        _RUNS[key] = (spec, _run_training(spec))
    return _RUNS[key]


def lora_run(tmp_path_factory):
    return shared_run(tmp_path_factory, "lora", rows=16, eval_rows=4, held_out=held_out_rows(4),
                      training={"eval_strategy": "steps", "eval_steps": 2},
                      tags={"dagster_run_id": "run-42", "data_version": "dv-7", "adapter_version": "ad-1"})


def full_run(tmp_path_factory):
    return shared_run(tmp_path_factory, "full", rows=8, training={"mode": "full", "learning_rate": 1e-3})


