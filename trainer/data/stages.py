"""The data stages as values: a name, a code version, the parameters that enter the key, the
upstream stages it reads, and a `build(inputs, out_dir) -> manifest` that receives their outputs.

raw → templated → tokenized → packed, per split; templated and tokenized also read the
tokenizer stage. `trainer.data.prepare.DataPipeline` makes the stage values of an experiment and
runs them through the store; what enters each key is decided in `trainer.core.keys`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from trainer.core.arrow_io import read_table, write_shards, write_table
from trainer.core.config import DataConfig, Experiment, SourceConfig
from trainer.core.keys import packing_strategy
from trainer.core.schemas import HELD_OUT, IGNORE_INDEX
from trainer.core.store import CODE_VERSIONS, StageOutput, content_key
from trainer.data.formats import RowError, load_formatting_func, normalize
from trainer.data.packing import length_histogram, pack
from trainer.data.sources import build_raw_table

# The per-split stages, in build order.
DATA_STAGES = ("raw", "templated", "tokenized", "packed")

REJECTS_SCHEMA = pa.schema([("row_id", pa.int64()), ("stage", pa.string()), ("reason", pa.string())])

# A stage's upstream outputs, by stage name.
Inputs = dict[str, StageOutput]
# (tokenizer, template set-up) of a tokenizer stage output.
TokenizerOf = Callable[[StageOutput], tuple[Any, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  # upstream stage names, in the order their keys enter this key
    params: dict[str, Any]  # from trainer.core.keys
    build: Callable[[Inputs, Path], dict[str, Any]]

    @property
    def code_version(self) -> str:
        return CODE_VERSIONS[self.name]

    def key(self, input_keys: Sequence[str]) -> str:
        return content_key(self.name, inputs=list(input_keys), params=self.params, code_version=self.code_version)


@dataclass(frozen=True)
class IdentityStage(Stage):
    """A stage keyed by the identity of what it holds, not by how it was made: the set-up
    tokenizer (the same content from other files or under another name is the same output)."""

    def key(self, input_keys: Sequence[str]) -> str:
        return self.params["identity"]


def source_for(data: DataConfig, split: str) -> tuple[SourceConfig, bool]:
    """(the split's source, whether the eval fraction is carved out of it)"""
    if split == "eval" and data.eval.source is not None:
        return data.eval.source, False
    return data.source, data.eval.source is None and data.eval.fraction > 0


# -- rejects -------------------------------------------------------------------------------------

def write_rejects(directory: Path, stage: str, rejects: list[tuple[int, str]]) -> dict[str, int]:
    table = pa.table([pa.array([r for r, _ in rejects], pa.int64()), pa.array([stage] * len(rejects), pa.string()),
                      pa.array([why for _, why in rejects], pa.string())], schema=REJECTS_SCHEMA)
    write_table(directory / "rejects.arrow", table)
    # Reasons grouped by their kind (the text before the first colon), so counts stay readable.
    return dict(Counter(why.split(":")[0] for _, why in rejects).most_common())


def read_rejects(stage_output: StageOutput) -> pa.Table:
    return read_table(stage_output.path / "rejects.arrow")


def _write_rows(out_dir: Path, stage: str, split: str, rows_in: int, table: pa.Table,
                rejects: list[tuple[int, str]], **counts: int) -> dict[str, Any]:
    """Write a stage's rows and rejects; its manifest's counts (rows_in == rows_out + rejects)."""
    write_table(out_dir / "rows.arrow", table)
    return {"split": split, "counts": {"rows_in": rows_in, "rows_out": table.num_rows, "rejects": len(rejects),
                                       **counts},
            "reject_reasons": write_rejects(out_dir, stage, rejects)}


# -- builds: each receives its bound settings, then (inputs, out_dir). Templating, tokenization and
# pyarrow.compute are imported where they build: a cached preparation never loads them.

def build_raw(exp: Experiment, split: str, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
    """The split's records (no inputs: it reads the source); malformed ones are rejects."""
    source, carved = source_for(exp.data, split)
    table, not_selected = build_raw_table(source, exp.base_dir, exp.data.eval if carved else None, side=split)
    bad = table.column("error").is_valid()
    rejects = [(int(r), f"malformed record at {w}: {e}") for r, w, e in zip(
        table.column("row_id").filter(bad).to_pylist(), table.column("source").filter(bad).to_pylist(),
        table.column("error").filter(bad).to_pylist())]
    # Records `where` leaves out are not rows of this stage (rows_in counts the selected ones).
    selection = {"not_selected": not_selected} if source.where else {}
    return _write_rows(out_dir, "raw", split, table.num_rows, table.filter(table.column("error").is_null()), rejects,
                       **selection)


def build_templated(exp: Experiment, split: str, tokenizer_of: TokenizerOf, progress: bool,
                    inputs: Inputs, out_dir: Path) -> dict[str, Any]:
    from trainer.data.templating import template_rows

    data = exp.data
    func = load_formatting_func(data.formatting_func) if data.formatting_func else None
    tok, setup = tokenizer_of(inputs["tokenizer"])
    raw_table = read_table(inputs["raw"].path / "rows.arrow")
    rows = list(zip(raw_table.column("row_id").to_pylist(), map(json.loads, raw_table.column("record").to_pylist())))
    table, rejects = template_rows(rows, tok, setup, data, formatting_func=func, progress=progress)
    manifest = _write_rows(out_dir, "templated", split, len(rows), table, rejects)
    manifest["template"] = {"end_of_turn": setup.eot_token, "markers_not_special": setup.markers_not_special,
                            "generation_prompt_matches_training": setup.generation_prompt_matches_training}
    if split == "eval":
        rejected = {r for r, _ in rejects}
        kept = [(row_id, record) for row_id, record in rows if row_id not in rejected]
        manifest["held_out_prompts"], manifest["generation_prompt_differs"] = _write_held_out(
            out_dir / HELD_OUT, kept, tok, setup, data, func)
    return manifest


def _write_held_out(path: Path, rows: list[tuple[int, Any]], tok: Any, setup: Any, data: DataConfig,
                    func: Callable[[dict], str] | None) -> tuple[int, int]:
    """The eval rows' prompts exactly as inference sends them (the template's generation prompt),
    with their references. Returns (prompts written, rows whose training text before the answer
    is not that prompt)."""
    from trainer.data.templating import generation_prompt

    written = differs = 0
    with open(path, "w", encoding="utf-8") as f:
        for row_id, record in rows:
            try:
                gp = generation_prompt(normalize(record, data, func), tok, setup, data)
            except RowError:
                continue
            reference = gp.reference
            if isinstance(record, dict) and isinstance(record.get("answer"), str):
                reference = record["answer"]
            differs += not gp.matches_training
            f.write(json.dumps({"row_id": row_id, "prompt": gp.prompt, "reference": reference}) + "\n")
            written += 1
    return written, differs


def build_tokenized(split: str, tokenizer_of: TokenizerOf, progress: bool, inputs: Inputs,
                    out_dir: Path) -> dict[str, Any]:
    import pyarrow.compute as pc

    from trainer.data.tokenization import tokenize_rows

    table_in = read_table(inputs["templated"].path / "rows.arrow")
    table, rejects = tokenize_rows(table_in, tokenizer_of(inputs["tokenizer"])[0], progress=progress)
    labels = table.column("labels").combine_chunks().flatten()
    trainable = int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
    return _write_rows(out_dir, "tokenized", split, table_in.num_rows, table, rejects,
                       tokens=len(labels), trainable_tokens=trainable)


def build_packed(exp: Experiment, split: str, progress: bool, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
    d = exp.data
    result = pack(read_table(inputs["tokenized"].path / "rows.arrow"), d.max_length,
                  strategy=packing_strategy(exp, split), overlong=d.overlong, truncate_side=d.truncate_side,
                  progress=progress)
    files = write_shards(out_dir, result.table, d.rows_per_shard)
    return {"split": split, "counts": dict(result.counts), "files": files,
            "rows_per_file": [min(d.rows_per_shard, result.table.num_rows - i * d.rows_per_shard)
                              for i in range(len(files))],
            "length_histogram": length_histogram(result.doc_lengths, d.max_length),
            "reject_reasons": write_rejects(out_dir, "packed", result.rejects)}
