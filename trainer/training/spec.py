"""What passes between the orchestrator and the training and merging processes: typed, as JSON.

The orchestrator writes a `TrainingSpec` (or a `MergeSpec`) file and starts
`python -m trainer.training.train SPEC` (or `trainer.training.merge`); the training process
writes a `TrainingSummary` into the finished adapter directory. Each is read back into the same
dataclass, so a field added on one side is a field the other side knows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.config import Experiment, experiment_from_dict
from trainer.core.schemas import TRAINING_SUMMARY


class SpecError(ValueError):
    pass


def _optional_path(value: Any) -> Path | None:
    return Path(value) if value else None


@dataclass(frozen=True)
class TrainingSpec:
    experiment: Experiment
    train_shards: Path  # packed shard-*.arrow files
    tokenizer_dir: Path  # the data stage's tokenizer, with its template_setup.json
    output_dir: Path  # the finished adapter (or full model); work goes to `<output_dir>.partial`
    eval_shards: Path | None = None
    held_out: Path | None = None  # JSONL of {"prompt": generation prompt, "reference": str}
    base_model: str | None = None  # resolved base (path or hub id); None: resolved from experiment.model
    tags: dict[str, str] = field(default_factory=dict)  # MLflow tags; "adapter_version" is the Pipes data version

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainingSpec":
        for key in ("experiment", "train_shards", "tokenizer_dir", "output_dir"):
            if not raw.get(key):
                raise SpecError(f"spec: {key!r} is required")
        experiment = dict(raw["experiment"])
        base_dir = experiment.pop("base_dir", ".")
        return cls(experiment=experiment_from_dict(experiment, base_dir=base_dir),
                   train_shards=Path(raw["train_shards"]), tokenizer_dir=Path(raw["tokenizer_dir"]),
                   output_dir=Path(raw["output_dir"]).expanduser().resolve(),
                   eval_shards=_optional_path(raw.get("eval_shards")), held_out=_optional_path(raw.get("held_out")),
                   base_model=raw.get("base_model") or None,
                   tags={str(k): str(v) for k, v in (raw.get("tags") or {}).items()})

    @classmethod
    def load(cls, source: "str | Path | dict | TrainingSpec") -> "TrainingSpec":
        if isinstance(source, TrainingSpec):
            return source
        return cls.from_dict(source if isinstance(source, dict) else json.loads(Path(source).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": {**self.experiment.to_dict(), "base_dir": self.experiment.base_dir},
                "train_shards": str(self.train_shards), "eval_shards": _str_or_none(self.eval_shards),
                "tokenizer_dir": str(self.tokenizer_dir), "held_out": _str_or_none(self.held_out),
                "output_dir": str(self.output_dir), "base_model": self.base_model, "tags": dict(self.tags)}


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
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    resumed_from_step: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainingSummary":
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    @classmethod
    def read(cls, directory: str | Path) -> "TrainingSummary":
        return cls.from_dict(json.loads((Path(directory) / TRAINING_SUMMARY).read_text()))

    def write(self, directory: str | Path) -> None:
        """Atomically: a reader sees no summary or a whole one."""
        directory = Path(directory)
        tmp = directory / f".{TRAINING_SUMMARY}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        os.replace(tmp, directory / TRAINING_SUMMARY)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scalars(self) -> dict[str, Any]:
        """The numbers and texts (no lists or mappings): what asset metadata and Pipes carry."""
        return {k: v for k, v in self.to_dict().items() if v is not None and not isinstance(v, (list, dict))}


@dataclass(frozen=True)
class MergeSpec:
    adapter_dir: Path
    base_model: str
    tokenizer_dir: Path
    output_dir: Path
    score_path: Path  # keyed by what it measures: more held-out rows rescore, never remerge
    eot_token: str | None
    held_out: Path | None
    accuracy_rows: int
    max_new_tokens: int
    versions: dict[str, str]  # adapter, merged and score keys, copied into the score file

    @classmethod
    def load(cls, path: str | Path) -> "MergeSpec":
        raw = json.loads(Path(path).read_text())
        return cls(adapter_dir=Path(raw["adapter_dir"]), base_model=raw["base_model"],
                   tokenizer_dir=Path(raw["tokenizer_dir"]), output_dir=Path(raw["output_dir"]),
                   score_path=Path(raw["score_path"]), eot_token=raw["eot_token"],
                   held_out=_optional_path(raw["held_out"]), accuracy_rows=int(raw["accuracy_rows"]),
                   max_new_tokens=int(raw["max_new_tokens"]), versions=dict(raw["versions"]))

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def write_spec(directory: Path, name: str, spec: TrainingSpec | MergeSpec) -> Path:
    """Atomically (a process of a concurrent materialization may be reading it), and only when
    its content changed: planning again leaves an unchanged spec untouched."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    text = json.dumps(spec.to_dict(), indent=2)
    if path.is_file() and path.read_text() == text:
        return path
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
