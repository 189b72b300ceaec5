"""The data stages as values: a name, a code version, the parameters that enter the key, the
upstream stages it reads, and a `build(inputs, out_dir) -> manifest` that receives their outputs.

raw → templated → tokenized → packed, per split; templated and tokenized also read the
tokenizer stage. `trainer.data.prepare.DataPipeline` makes the stage values of an experiment and
runs them through the store; what enters each key is decided in `trainer.core.keys`.

raw, templated and tokenized work shard by shard (`trainer.data.shards`): each shard is its own
stage output under its own key (built in parallel, `trainer.data.parallel`), streamed in record
batches so memory is set by the batch, its rows numbered from 0. The split's output of such a
stage is an index: a manifest listing its shards in order with the number of their first row
(`row_base`), the counts summed, and the rejects and held-out prompts of all shards with their
split-wide row numbers. `read_rows` reads a split's rows whole (small splits, tests). The packed
stage reads every tokenized shard's lengths, plans globally and writes its files batch by batch.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from trainer.core import keys
from trainer.core.arrow_io import BatchWriter, iter_batches, read_table
from trainer.core.config import DataConfig, EvalConfig, Experiment, SourceConfig
from trainer.core.schemas import HELD_OUT
from trainer.core.graph import data_stage_inputs
from trainer.core.store import CODE_VERSIONS, StageOutput, Store, content_key
from trainer.data.record_formats import RowError, asked_of, load_formatting_func, normalize
from trainer.data.parallel import ShardBuilder, ShardTask
from trainer.data.shards import SourceShard
from trainer.data.sources import RAW_SCHEMA, RawCounts, check_selection, raw_batches

ROWS = "rows.arrow"
# A tokenized shard's rows' trainable tokens after their first, batch by batch as rows.arrow.
ROW_TRAINABLE = "row_trainable.arrow"
ROW_TRAINABLE_SCHEMA = pa.schema([("trainable_after_first", pa.int32())])
# Rows per record batch: what a stage holds in memory at a time.
BATCH_ROWS = 8192

REJECTS_SCHEMA = pa.schema([("row_id", pa.int64()), ("stage", pa.string()), ("reason", pa.string())])

# A stage's upstream outputs, by stage name.
Inputs = dict[str, StageOutput]


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  # upstream stage names, in the order their keys enter this key
    params: dict[str, Any]  # from trainer.core.keys
    build: Callable[[Inputs, Path], dict[str, Any]]
    # A sharded stage: its shards as (key, build) from its inputs, each buildable on its own.
    tasks: Callable[[Inputs], list[ShardTask]] | None = None

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
    with BatchWriter(directory / "rejects.arrow", REJECTS_SCHEMA) as out:
        out.write(table)
    # Reasons grouped by their kind (the text before the first colon), so counts stay readable.
    return dict(Counter(why.split(":")[0] for _, why in rejects).most_common())


def read_rejects(stage_output: StageOutput) -> pa.Table:
    return read_table(stage_output.path / "rejects.arrow")


# -- the tokenizer a shard is built with -----------------------------------------------------------

# The one tokenizer cache of a process: set-up tokenizers by identity (the tokenizer stage's key,
# a hash of their content), so what it holds is exactly what the key names, however it was
# loaded (from its source files by the pipeline, or from the store by a shard worker).
_TOKENIZERS: "OrderedDict[str, tuple[Any, Any]]" = OrderedDict()
_TOKENIZERS_MAX = 4
_TOKENIZERS_LOCK = threading.Lock()


def hold_tokenizer(identity: str, tok: Any, setup: Any) -> None:
    with _TOKENIZERS_LOCK:
        _TOKENIZERS[identity] = (tok, setup)
        _TOKENIZERS.move_to_end(identity)
        while len(_TOKENIZERS) > _TOKENIZERS_MAX:
            _TOKENIZERS.popitem(last=False)


def held_tokenizer(identity: str) -> tuple[Any, Any] | None:
    with _TOKENIZERS_LOCK:
        return _TOKENIZERS.get(identity)


def clear_tokenizers() -> None:
    with _TOKENIZERS_LOCK:
        _TOKENIZERS.clear()


def load_stored_tokenizer(path: str | Path) -> tuple[Any, Any]:
    """(tokenizer, template set-up) of a tokenizer stage directory."""
    from trainer.core.template_setup import load_template_setup

    config = json.loads((Path(path) / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        # The class AutoTokenizer would pick, without AutoTokenizer's import of torch (a second
        # or more, in a process that prepares data and never needs torch).
        from transformers import PreTrainedTokenizerFast as tokenizer_class  # TokenizersBackend in 5.x
    else:
        from transformers import AutoTokenizer as tokenizer_class
    return tokenizer_class.from_pretrained(str(path)), load_template_setup(path)


def tokenizer_of(tokenizer: StageOutput) -> tuple[Any, Any]:
    """(tokenizer, template set-up) of a tokenizer stage output: held, else read from the store."""
    held = held_tokenizer(tokenizer.key)
    if held is None:
        held = load_stored_tokenizer(tokenizer.path)
        hold_tokenizer(tokenizer.key, *held)
    return held


# -- one shard: read in record batches, written in record batches -----------------------------------

def _shard_manifest(split: str, rows_in: int, rows_out: int, stage: str, rejects: list[tuple[int, str]],
                    out_dir: Path, **counts: int) -> dict[str, Any]:
    """A stage's counts (rows_in == rows_out + rejects) and its rejects file."""
    return {"split": split, "counts": {"rows_in": rows_in, "rows_out": rows_out, "rejects": len(rejects), **counts},
            "reject_reasons": write_rejects(out_dir, stage, rejects)}


def build_raw_shard(source: SourceConfig, holdout: EvalConfig | None, split: str, shard: SourceShard,
                    out_dir: Path) -> dict[str, Any]:
    """A shard's records of the split; malformed ones are rejects naming their file and line."""
    counts, rejects, rows_in = RawCounts(), [], 0
    with BatchWriter(out_dir / ROWS, RAW_SCHEMA) as out:
        for table in raw_batches(source, shard, holdout, split, counts, BATCH_ROWS):
            rows_in += table.num_rows
            bad = table.filter(table.column("error").is_valid())
            rejects += [(r, f"malformed record at {w}: {e}") for r, w, e in zip(
                bad.column("row_id").to_pylist(), bad.column("source").to_pylist(), bad.column("error").to_pylist())]
            out.write(table.filter(table.column("error").is_null()))
    # Records `where` leaves out are not rows of this stage (rows_in counts the selected ones).
    selection = {"not_selected": counts.not_selected} if source.where else {}
    manifest = _shard_manifest(split, rows_in, out.rows, "raw", rejects, out_dir, **selection)
    return {**manifest, "shard": shard.label, "records": counts.records, "selected": counts.selected}


def build_templated_shard(data: DataConfig, split: str, tokenizer: StageOutput, raw: Path,
                          out_dir: Path) -> dict[str, Any]:
    from trainer.data.templating import TEMPLATED_SCHEMA, template_rows

    func = load_formatting_func(data.formatting_func) if data.formatting_func else None
    tok, setup = tokenizer_of(tokenizer)
    rejects: list[tuple[int, str]] = []
    rows_in = prompts = differs = 0
    held_out = open(out_dir / HELD_OUT, "w", encoding="utf-8") if split == "eval" else None
    try:
        with BatchWriter(out_dir / ROWS, TEMPLATED_SCHEMA) as out:
            for batch in iter_batches(raw / ROWS):
                rows = list(zip(batch.column("row_id").to_pylist(), map(json.loads, batch.column("record").to_pylist())))
                table, batch_rejects = template_rows(rows, tok, setup, data, formatting_func=func, progress=False)
                out.write(table)
                rows_in += len(rows)
                rejects += batch_rejects
                if held_out is not None:
                    rejected = {r for r, _ in batch_rejects}
                    sources = map(source_label, batch.column("source").to_pylist())
                    written, different = _write_held_out(
                        held_out, [(r, rec, src) for (r, rec), src in zip(rows, sources) if r not in rejected],
                        tok, setup, data, func)
                    prompts, differs = prompts + written, differs + different
    finally:
        if held_out is not None:
            held_out.close()
    manifest = _shard_manifest(split, rows_in, out.rows, "templated", rejects, out_dir)
    manifest["template"] = {"end_of_turn": setup.eot_token, "markers_not_special": setup.markers_not_special,
                            "generation_prompt_matches_training": setup.generation_prompt_matches_training}
    if held_out is not None:
        manifest["held_out_prompts"], manifest["generation_prompt_differs"] = prompts, differs
    return manifest


# A raw row's `source` is its file (or dataset) and where in it: `a.jsonl:12`, `b.csv[3]`.
_POSITION = re.compile(r"(?::\d+|\[\d+\])$")


def source_label(where: str | None) -> str | None:
    """The file (or hub/builtin dataset) a raw row came from, without its line or index: what
    held-out figures are grouped by. Only the name: the rows are keyed by it, not by its folder."""
    return None if where is None else _POSITION.sub("", where)


def _write_held_out(f, rows: list[tuple[int, Any, str | None]], tok: Any, setup: Any, data: DataConfig,
                    func: Callable[[dict], str] | None) -> tuple[int, int]:
    """The eval rows' prompts exactly as inference sends them (the template's generation prompt),
    with their references, what each asked as the loop's filters hand it to a verifier (`asked`:
    a prompt string, a conversation before its answer, or null), the text training ends the answer
    with (`answer_end`: the template's end-of-turn in a conversation, else eos), its `task` (a
    record's string field) and its `source` file. Returns (prompts written, rows whose training
    text before the answer is not that prompt)."""
    from trainer.data.templating import generation_prompt

    written = differs = 0
    for row_id, record, source in rows:
        try:
            example = normalize(record, data, func)
            gp = generation_prompt(example, tok, setup, data)
        except RowError:
            continue
        reference = gp.reference
        if isinstance(record, dict) and isinstance(record.get("answer"), str):
            reference = record["answer"]
        differs += not gp.matches_training
        asked = asked_of(example)
        end = (setup.eot_token or tok.eos_token) if isinstance(asked, list) else tok.eos_token
        row = {"row_id": row_id, "prompt": gp.prompt, "reference": reference, "asked": asked, "answer_end": end or ""}
        if isinstance(record, dict) and isinstance(record.get("task"), str):
            row["task"] = record["task"]
        if source is not None:
            row["source"] = source
        f.write(json.dumps(row) + "\n")
        written += 1
    return written, differs


def build_tokenized_shard(split: str, tokenizer: StageOutput, templated: Path, out_dir: Path) -> dict[str, Any]:
    import numpy as np

    from trainer.core.schemas import IGNORE_INDEX
    from trainer.data.tokenization import TOKENIZED_SCHEMA, tokenize_rows

    from trainer.data.packing import trainable_after_first

    tok = tokenizer_of(tokenizer)[0]
    rejects: list[tuple[int, str]] = []
    rows_in = tokens = trainable = 0
    with BatchWriter(out_dir / ROWS, TOKENIZED_SCHEMA) as out, \
            BatchWriter(out_dir / ROW_TRAINABLE, ROW_TRAINABLE_SCHEMA) as counts:
        for batch in iter_batches(templated / ROWS):
            table, batch_rejects = tokenize_rows(pa.Table.from_batches([batch]), tok, progress=False)
            out.write(table)
            # beside each batch of rows, their trainable tokens: packing plans without reading the labels
            counts.write(pa.table([pa.array(trainable_after_first(table.column("labels")))], ROW_TRAINABLE_SCHEMA))
            rows_in += batch.num_rows
            rejects += batch_rejects
            labels = table.column("labels").combine_chunks().values.to_numpy(zero_copy_only=False)
            tokens += len(labels)
            trainable += int(np.count_nonzero(labels != IGNORE_INDEX))
    return _shard_manifest(split, rows_in, out.rows, "tokenized", rejects, out_dir, tokens=tokens,
                           trainable_tokens=trainable)


# -- a split: its shards, in order -------------------------------------------------------------------

def shard_outputs(index: StageOutput) -> list[tuple[StageOutput, int]]:
    """(shard output, number of its first row in the split) of a sharded stage's split output."""
    store = Store(index.path.parents[1])
    return [(store.get(index.stage, entry["key"]), entry["row_base"]) for entry in index.manifest["shards"]]


def read_rows(index: StageOutput) -> pa.Table:
    """A sharded stage's rows of one split as one table, rows numbered over the split (in memory:
    for small splits, the loop's prompts, and tests)."""
    tables = [_rebased(read_table(out.path / ROWS), base) for out, base in shard_outputs(index)]
    if tables:
        return pa.concat_tables(tables)
    from trainer.data.templating import TEMPLATED_SCHEMA
    from trainer.data.tokenization import TOKENIZED_SCHEMA

    return {"raw": RAW_SCHEMA, "templated": TEMPLATED_SCHEMA, "tokenized": TOKENIZED_SCHEMA}[index.stage].empty_table()


def _rebased(table: pa.Table, base: int) -> pa.Table:
    import pyarrow.compute as pc

    return table.set_column(0, "row_id", pc.add(table.column("row_id"), pa.scalar(base, pa.int64())))


def _write_index(stage: str, split: str, shards: list[StageOutput], bases: list[int], labels: list[str],
                 out_dir: Path) -> dict[str, Any]:
    """The split's output of a sharded stage: its shards in order, the counts summed, and the
    rejects (and held-out prompts) of all shards numbered over the split."""
    # rows_in == rows_out + rejects holds for a split with no shard too (an empty source file)
    totals: Counter = Counter({"rows_in": 0, "rows_out": 0, "rejects": 0})
    reasons: Counter = Counter()
    with BatchWriter(out_dir / "rejects.arrow", REJECTS_SCHEMA) as rejects:
        for out, base in zip(shards, bases):
            totals.update({k: v for k, v in out.manifest["counts"].items() if isinstance(v, int)})
            reasons.update(out.manifest["reject_reasons"])
            rejects.write(_rebased(read_rejects(out), base))
    manifest = {"split": split, "counts": dict(totals), "reject_reasons": dict(reasons.most_common()),
                "shards_built": sum(not out.cache_hit for out in shards),  # the others were in the store already
                "shards": [{"key": out.key, "label": label, "row_base": base, "counts": out.manifest["counts"]}
                           for out, base, label in zip(shards, bases, labels)]}
    if stage == "templated":
        if shards:
            manifest["template"] = shards[0].manifest["template"]
        if split == "eval":
            manifest["held_out_prompts"] = sum(out.manifest["held_out_prompts"] for out in shards)
            manifest["generation_prompt_differs"] = sum(out.manifest["generation_prompt_differs"] for out in shards)
            with open(out_dir / HELD_OUT, "w", encoding="utf-8") as f:
                for out, base in zip(shards, bases):
                    with open(out.path / HELD_OUT, encoding="utf-8") as shard_prompts:
                        for line in shard_prompts:
                            prompt = json.loads(line)
                            f.write(json.dumps({**prompt, "row_id": prompt["row_id"] + base}) + "\n")
    return manifest


# -- builds: each receives its bound settings, then (inputs, out_dir). Templating, tokenization and
# pyarrow.compute are imported where they build: a cached preparation never loads them.

def raw_tasks(exp: Experiment, split: str, shards: list[SourceShard]) -> list[ShardTask]:
    """The raw split's shards to have in the store: one per source shard."""
    source, carved = source_for(exp.data, split)
    holdout = exp.data.eval if carved else None
    return [(content_key("raw", inputs=[], params=keys.raw_shard_params(exp, split, source.where, shard.fingerprint(),
                                                                        carved)),
             functools.partial(build_raw_shard, source, holdout, split, shard)) for shard in shards]


def build_raw(exp: Experiment, split: str, shards: list[SourceShard], builder: ShardBuilder, inputs: Inputs,
              out_dir: Path) -> dict[str, Any]:
    """The split's records (no inputs: it reads the source's shards)."""
    source, _ = source_for(exp.data, split)
    outputs = builder.build("raw", raw_tasks(exp, split, shards), f"raw/{split}")
    bases, base = [], 0
    for out in outputs:
        bases.append(base)
        base += out.manifest["records"]
    check_selection(source, sum(out.manifest["selected"] for out in outputs),
                    sum(out.manifest["counts"].get("not_selected", 0) for out in outputs))
    return _write_index("raw", split, outputs, bases, [s.label for s in shards], out_dir)


def _derived_tasks(stage: str, index: StageOutput, tokenizer: StageOutput, params: dict[str, Any],
                   build: Callable[..., dict[str, Any]]) -> list[ShardTask]:
    """A stage built shard by shard from its input's shards and the tokenizer: each shard's key is
    its input shard's key, the tokenizer's and the stage's parameters."""
    location = Store(index.path.parents[1]).location
    return [(content_key(stage, inputs=[entry["key"], tokenizer.key], params=params),
             functools.partial(_from_input_shard, build, location, index.stage, entry["key"]))
            for entry in index.manifest["shards"]]


def _from_input_shard(build: Callable[..., dict[str, Any]], location: str, stage: str, key: str,
                      out_dir: Path) -> dict[str, Any]:
    """`build(input shard's directory, out_dir)`, the input shard made local first: a split's index
    found in a remote store (another machine built it) comes down without its shards."""
    return build(Store(location).get(stage, key).path, out_dir)


def templated_tasks(exp: Experiment, split: str, formatting_identity: str | None, inputs: Inputs) -> list[ShardTask]:
    return _derived_tasks("templated", inputs["raw"], inputs["tokenizer"], keys.templated_params(exp, formatting_identity),
                          functools.partial(build_templated_shard, exp.data, split, inputs["tokenizer"]))


def tokenized_tasks(split: str, inputs: Inputs) -> list[ShardTask]:
    return _derived_tasks("tokenized", inputs["templated"], inputs["tokenizer"], {},
                          functools.partial(build_tokenized_shard, split, inputs["tokenizer"]))


def build_derived(stage: str, split: str, tasks: Callable[[Inputs], list[ShardTask]], builder: ShardBuilder,
                  inputs: Inputs, out_dir: Path) -> dict[str, Any]:
    """templated or tokenized: its shards (built where missing), then the split's index."""
    outputs = builder.build(stage, tasks(inputs), f"{stage}/{split}")
    upstream = inputs[shard_input(stage)].manifest["shards"]
    return _write_index(stage, split, outputs, [e["row_base"] for e in upstream], [e["label"] for e in upstream],
                        out_dir)


def shard_input(stage: str) -> str:
    """The stage whose shards a sharded stage's shards are made from (its first input)."""
    return data_stage_inputs(stage)[0]


def build_packed(exp: Experiment, split: str, progress: bool, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from trainer.data.packing import (LENGTH_HISTOGRAM_PLOT, length_histogram, plan_files, plot_length_histogram,
                                      write_packed)
    from trainer.data.parallel import close_pools

    close_pools()  # packing is one process: the shard workers' memory is given back first
    d = exp.data
    shards = shard_outputs(inputs["tokenized"])
    plan = plan_files([out.path / ROWS for out, _ in shards], [base for _, base in shards], d.max_length,
                      strategy=keys.packing_strategy(exp, split), overlong=d.overlong, truncate_side=d.truncate_side,
                      progress=progress, row_trainable=[out.path / ROW_TRAINABLE for out, _ in shards])
    histogram = length_histogram(plan.doc_lengths, d.max_length)
    # Drawn once, with the shards (a cache hit shows the stored picture without importing
    # matplotlib), beside the writing: the files are written mostly outside the GIL.
    with ThreadPoolExecutor(1, thread_name_prefix="sftdag-histogram") as drawing:
        plot = drawing.submit(plot_length_histogram, histogram, d.max_length)
        result = write_packed(plan, out_dir, d.rows_per_shard, progress)
        (out_dir / LENGTH_HISTOGRAM_PLOT).write_bytes(plot.result())
    return {"split": split, "counts": dict(result.counts), "files": result.files, "rows_per_file": result.rows_per_file,
            "length_histogram": histogram,
            "reject_reasons": write_rejects(out_dir, "packed", result.rejects)}
