"""The declared graph: every stage of the pipeline, once.

Two tables, read by everything that needs to know the graph:

- `STAGES`: what the content-addressed store holds (`<store>/<stage>/<key>/`): each stage's code
  version (part of every key), the file that marks an output complete, the function in
  `trainer.core.keys` that decides its parameters, the process that builds it when it is not
  built in the orchestrator.
- `NODES`: the asset graph: each node an asset (its name, where its key lives: a data group, the
  shared models, an experiment, a loop round), the store stage(s) it materializes, the nodes whose
  keys enter its key (`inputs`, in key order) and the nodes it only reads (`reads`: held-out
  prompts for scoring, counts for a check; never part of a key, so reporting changes rebuild
  nothing).

`trainer.core.store` takes code versions and completion markers from here, `DataPipeline` takes
each data stage's inputs from here, and the Dagster definitions generate every asset's `ins` and
`deps` from here (tests/test_graph.py checks the graph Dagster loads against these tables).
Adding a data stage is one `Stage`, one `Node` and its build function (DESIGN.md shows one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from trainer.core import keys
from trainer.core.schemas import MERGE_INFO, SCORE, TRAINING_SUMMARY

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stage:
    name: str  # its directory in the store
    code_version: str  # bump whenever its code changes the bytes it writes
    params: Optional[Callable] = None  # trainer.core.keys: what of the settings enters its key
    marker: str = MANIFEST  # the file written last: the output is complete iff it exists
    process: Optional[str] = None  # `python -m <process> SPEC` builds it (a model is loaded there, never here)
    sharded: bool = False  # built shard by shard, each shard a stage output of its own; the split's is an index
    why: str = ""  # what the code version's history says


# Scopes: where an asset lives (its asset key's prefix).
DATA = "data"  # per data group: <group>/<asset>
MODELS = "models"  # shared by experiments: models/<name>
EXPERIMENT = "experiment"  # per experiment: <exp>/<asset>
LOOP = "loop"  # per experiment's loop: <exp>/loop/<asset>, the round steps partitioned by round


@dataclass(frozen=True)
class Node:
    asset: str
    scope: str
    stages: tuple[str, ...] = ()  # the store stages it materializes (none: an observed source)
    inputs: tuple[str, ...] = ()  # nodes whose keys enter its key, in key order
    reads: tuple[str, ...] = ()  # nodes it reads without their keys entering its own
    partitioned: bool = False  # one partition per loop round
    optional: bool = False  # present only for some experiments (a GGUF base, a loop)

    @property
    def stage(self) -> str | None:
        return self.stages[0] if self.stages else None

    @property
    def upstream(self) -> tuple[str, ...]:
        return self.inputs + self.reads


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenizer", "1", keys.tokenizer_params, why="keyed by its identity (content, chat template, versions)"),
    Stage("raw", "3", keys.raw_params, sharded=True,
          why="2: sharded; eval carved per record; 3: a byte-order mark at a file's start is not data"),
    Stage("templated", "5", keys.templated_params, sharded=True,
          why="2: turns located by the template's own text; end-of-turn text; tool calls; 3: sharded; "
              "4: held-out rows carry what they asked, their task and source file; 5: a record of no known "
              "format's reject names data.fields and data.formatting_func"),
    Stage("tokenized", "3", keys.tokenized_params, sharded=True,
          why="2: no word-start marker at piece boundaries (SentencePiece); 3: sharded"),
    Stage("packed", "2", keys.packed_params, why="2: no row without a trainable token (wrapped)"),
    Stage("base_model", "1", keys.base_model_params, process="trainer.models.convert",
          why="a GGUF converted to safetensors"),
    Stage("adapter", "1", keys.adapter_params, marker=TRAINING_SUMMARY, process="trainer.training.train"),
    Stage("merged", "1", keys.merged_params, marker=MERGE_INFO, process="trainer.training.merge"),
    Stage("score", "3", keys.score_params, marker=SCORE, process="trainer.training.score",
          why="2: a stage of its own, keyed by the held-out prompts; 3: its own process and asset, any model (the base "
              "too), held-out loss, per-task figures"),
    Stage("samples", "1", keys.samples_params, process="trainer.loop.sample"),
    Stage("accepted", "2", keys.accepted_params, why="2: preference pairs, SFT replay, the band filter"),
)}

# The data stages built per split, in build order (the tokenizer is shared by the splits).
DATA_STAGES = ("raw", "templated", "tokenized", "packed")

NODES: dict[str, Node] = {n.asset: n for n in (
    Node("raw_files", DATA),  # observed: the source files' content hash
    Node("tokenizer", DATA, ("tokenizer",)),
    Node("raw_dataset", DATA, ("raw",), reads=("raw_files",)),
    Node("templated_text", DATA, ("templated",), inputs=("raw_dataset", "tokenizer")),
    Node("tokenized_rows", DATA, ("tokenized",), inputs=("templated_text", "tokenizer")),
    # raw and templated: the reject rate over every stage, a check
    Node("packed_shards", DATA, ("packed",), inputs=("tokenized_rows",), reads=("templated_text", "raw_dataset")),
    Node("base_model", MODELS, ("base_model",), optional=True),
    # templated: the held-out prompts scored before and after; raw: the raw version, a tag
    Node("trained_adapter", EXPERIMENT, ("adapter",), inputs=("packed_shards", "tokenizer", "base_model"),
         reads=("templated_text", "raw_dataset")),
    Node("merged_model", EXPERIMENT, ("merged",), inputs=("trained_adapter",), reads=("tokenizer",)),
    # the merged model and its base scored on the held-out prompts by the experiment's scorers
    Node("evaluation", EXPERIMENT, ("score",), inputs=("merged_model", "templated_text"),
         reads=("trained_adapter", "tokenizer")),
    # the merged model registered in MLflow; the alias moves only when its evaluation beats the holder's
    Node("champion", EXPERIMENT, (), inputs=("evaluation", "merged_model"), reads=("trained_adapter",),
         optional=True),
    # The loop, a partition per round: its prompts through raw → templated (built once, then found), the round's steps.
    Node("prompts", LOOP, ("raw", "templated"), inputs=("tokenizer",), partitioned=True, optional=True),
    # round 0's generator: the start model (merged_model, base_model or a directory); round r: round r-1's round_eval
    Node("round_samples", LOOP, ("samples",), inputs=("prompts", "merged_model", "base_model"), reads=("tokenizer",),
         partitioned=True, optional=True),
    # raw_dataset: the SFT rows `loop.training.replay` mixes in (its key enters only when replay > 0)
    Node("round_accepted", LOOP, ("accepted",), inputs=("round_samples", "prompts", "raw_dataset"), partitioned=True,
         optional=True),
    Node("round_adapter", LOOP, ("raw", "templated", "tokenized", "packed", "adapter"),
         inputs=("round_accepted", "tokenizer", "merged_model", "base_model"), reads=("templated_text",),
         partitioned=True, optional=True),
    # merged into the starting model the round trained on; the round's experiment from its accepted rows
    Node("round_eval", LOOP, ("merged", "score"), inputs=("round_adapter", "templated_text"),
         reads=("round_accepted", "tokenizer", "merged_model", "base_model"), partitioned=True, optional=True),
)}

# The data stage each data node builds, and back.
STAGE_NODE = {n.stage: name for name, n in NODES.items() if n.scope == DATA and n.stage}


def data_stage_inputs(stage: str) -> tuple[str, ...]:
    """The stages whose keys enter a data stage's key, in key order (from its node's inputs)."""
    node = NODES[STAGE_NODE[stage]]
    return tuple(NODES[i].stage for i in node.inputs if NODES[i].stage)


def code_version(stage: str) -> str:
    return STAGES[stage].code_version


def completion_marker(stage: str) -> str:
    return STAGES[stage].marker if stage in STAGES else MANIFEST
