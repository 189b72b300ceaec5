"""What passes between the orchestrator and the training and merging processes: typed, as JSON.

The orchestrator writes a `TrainingSpec` (a `MergeSpec`, a `ScoreSpec`) file and starts
`python -m trainer.training.train SPEC` (`trainer.training.merge`, `trainer.training.score`); the training process
writes a `TrainingSummary` into the finished adapter directory. Each is read back into the same
dataclass (`trainer.core.process_step.spec_from_json`, by its type hints), so a field added on
one side is a field the other side knows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.config import Experiment
from trainer.core.process_step import JsonSpec, SpecError
from trainer.core.schemas import TRAINING_SUMMARY

__all__ = ["MergeSpec", "ScoreSpec", "SpecError", "TrainingSpec", "TrainingSummary"]


@dataclass(frozen=True)
class TrainingSpec(JsonSpec):
    experiment: Experiment
    train_shards: Path  # packed shard-*.arrow files
    tokenizer_dir: Path  # the data stage's tokenizer, with its template_setup.json
    output_dir: Path  # the finished adapter (or full model); work goes to `<output_dir>.partial`
    eval_shards: Path | None = None
    held_out: Path | None = None  # JSONL of {"prompt": generation prompt, "reference": str}
    base_model: str | None = None  # resolved base (path or hub id); None: resolved from experiment.model
    tags: dict[str, str] = field(default_factory=dict)  # MLflow tags; "adapter_version" is the Pipes data version

    def __post_init__(self) -> None:
        # Every process (and every machine's) names the same directory, whatever its working directory.
        object.__setattr__(self, "output_dir", Path(self.output_dir).expanduser().resolve())


@dataclass(frozen=True)
class TrainingSummary:
    """`training_summary.json`: written last, its presence marks a training as finished."""

    experiment: str
    mode: str
    output_dir: str
    base_model: str
    base_model_path: str
    global_step: int
    steps_per_epoch: int
    train_rows: int
    world_size: int
    train_loss: float
    trainable_tokens: int
    tokens: int
    train_runtime: float
    vocab_size: int
    base_vocab_rows: int
    new_token_ids: list[int]
    eot_token: str | None
    tags: dict[str, str]
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    eval_loss: float | None = None
    resumed_from_step: int | None = None
    # fp32, bf16 or fp16: `training.precision` as resolved on the training device (None: trained
    # before the field existed)
    precision: str | None = None
    # The training process's peak resident memory (rank 0's, GB) and, on a GPU, the most its tensors
    # held there (GB); None: trained before the fields existed
    peak_rss_gb: float | None = None
    peak_gpu_gb: float | None = None
    # `training.keep_checkpoints`: [{"step": N, "path": "checkpoints/step-N"}] (relative to the
    # output directory, by step) for the checkpoints kept in the output; empty when none are kept.
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainingSummary":
        """The fields it knows; a key it does not know is left out, so a summary written by an
        older version loads (one with `accuracy_before`/`accuracy_after`: the training once scored
        the held-out rows itself, which the evaluation asset now does)."""
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    @classmethod
    def read(cls, directory: str | Path) -> "TrainingSummary":
        return cls.from_dict(json.loads((Path(directory) / TRAINING_SUMMARY).read_text()))

    def write(self, directory: str | Path) -> None:
        """Atomically: a reader sees no summary or a whole one."""
        from trainer.core.store import write_durably

        write_durably(Path(directory) / TRAINING_SUMMARY, json.dumps(self.to_dict(), indent=1, default=str))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scalars(self) -> dict[str, Any]:
        """The numbers and texts (no lists or mappings): what asset metadata and Pipes carry."""
        return {k: v for k, v in self.to_dict().items() if v is not None and not isinstance(v, (list, dict))}


@dataclass(frozen=True)
class MergeSpec(JsonSpec):
    """Merge an adapter into `<store>/merged/<merged_key>/` (once)."""

    adapter_dir: Path
    base_model: str
    tokenizer_dir: Path
    store: str  # the store's location (a directory or an object-storage URL)
    merged_key: str
    eot_token: str | None = None


@dataclass(frozen=True)
class ScoreSpec(JsonSpec):
    """Score models on the held-out prompts, each into `<store>/score/<its score key>/` (once per
    key): `models` maps a role (`merged`: the trained model; `base`: the model it was trained
    from, the "before") to `{"model_dir", "score_key", "versions"}`."""

    store: str
    tokenizer_dir: Path  # the data stage's tokenizer: the base model may hold none (or an older one)
    models: dict[str, dict[str, Any]]
    accuracy_rows: int
    max_new_tokens: int
    eot_token: str | None = None
    held_out: Path | None = None
    # How answers are judged (`trainer.training.scorers`): the entries as written, where they come
    # from (`eval.scorers`, or the loop filter whose verifier is the default) and the folder a
    # verifier file beside the YAML is found in.
    scorers: list[Any] = field(default_factory=lambda: ["exact"])
    scorers_where: str = "eval.scorers"
    scorers_base_dir: str = "."
