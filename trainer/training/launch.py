"""Plans for the training stages: adapter and merged-model keys, the run spec, the launch command.

Nothing here trains: `trainer.training.train` does, in its own process (so a crash cannot take the
orchestrator with it), and `trainer.training.merge` merges. This module decides *what* to train, where
the result goes, and whether it already exists.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core import keys
from trainer.core.config import ConfigError, Experiment
from trainer.data.prepare import DataPipeline
from trainer.core.schemas import HELD_OUT
from trainer.core.store import StageOutput, Store, content_key, file_digest
from trainer.core.template_setup import load_template_setup
from trainer.models.gguf import STAGE as GGUF_STAGE
from trainer.training.spec import MergeSpec, TrainingSpec, TrainingSummary, write_spec


def model_identity(exp: Experiment, resolved_base: str) -> dict[str, Any]:
    """What identifies the base weights: the config (hash in the directory name) for the builtin
    model, the conversion key for a GGUF (or a model converted from one: a loop's start), file
    contents for a local model, id+revision for the hub."""
    base = Path(resolved_base)
    if exp.model.base.startswith("builtin:") or base.parent.name == GGUF_STAGE:
        # Named by what it is made from (a config's hash; a GGUF's digest and the conversion's versions).
        return {"builtin" if base.parent.name != GGUF_STAGE else "gguf": base.name}
    if base.is_dir():
        files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        return {"local": [[p.name, file_digest(p)] for p in files]}
    return {"hub": exp.model.base, "revision": exp.model.revision}


@dataclass
class AdapterPlan:
    key: str
    output_dir: Path
    spec_path: Path
    spec: TrainingSpec
    data_version: str
    base_model: str

    @property
    def complete(self) -> bool:
        return Store(self.output_dir.parents[1]).has("adapter", self.key)

    def summary(self) -> TrainingSummary:
        return TrainingSummary.from_dict(self.output().manifest)

    def output(self) -> StageOutput:
        """The finished adapter as a stage output (its manifest: the training summary), published
        to the store's remote copy when it has one."""
        return Store(self.output_dir.parents[1]).publish("adapter", self.key)


def held_out_file(templated_eval: StageOutput | None) -> Path | None:
    """The held-out generation prompts a templated eval split wrote, when there is one."""
    return templated_eval.path / HELD_OUT if templated_eval is not None else None


def held_out_path(data: dict[str, StageOutput]) -> Path | None:
    return held_out_file(data.get("templated/eval"))


def plan_adapter(exp: Experiment, data: dict[str, StageOutput] | None = None,
                 tags: dict[str, str] | None = None, held_out: Path | None = None) -> AdapterPlan:
    """What to train: from the data stages' outputs (a Dagster asset receives them), or, without
    them, from running the data stages (every one a cache hit once prepared). `held_out`: the
    prompts to score on when the data has no eval split of its own (a loop round's)."""
    from trainer.training.models import is_built_here, planned_base_model

    pipeline = DataPipeline(exp, progress=False)
    store = pipeline.store
    outputs = data if data is not None else pipeline.run()
    tokenizer = outputs["tokenizer"].manifest
    setup = load_template_setup(outputs["tokenizer"].path)
    base_vocab = tokenizer["vocab_size"] - len(setup.added_tokens)
    # The builtin model is built, a GGUF converted, by the processes, never here (no torch in the
    # orchestrator): only planned.
    builtin = is_built_here(exp.model)
    base_model = planned_base_model(exp.model, store.root, base_vocab, exp.base_dir)

    train_key = outputs["packed/train"].key
    eval_key = outputs["packed/eval"].key if "packed/eval" in outputs else None
    data_version = train_key + (f"+{eval_key}" if eval_key else "")
    params = keys.adapter_params(exp, model_identity(exp, base_model), tokenizer["identity"])
    key = content_key("adapter", inputs=[k for k in (train_key, eval_key) if k], params=params)
    raw = "+".join(outputs[f"raw/{split}"].key for split in pipeline.splits())
    spec = TrainingSpec(
        experiment=exp, train_shards=outputs["packed/train"].path, tokenizer_dir=outputs["tokenizer"].path,
        output_dir=store.path("adapter", key), eval_shards=outputs["packed/eval"].path if eval_key else None,
        held_out=held_out_path(outputs) if eval_key else held_out, base_model=None if builtin else base_model,
        tags={"data_version": data_version, "adapter_version": key, "experiment": exp.name, "raw_version": raw,
              "data_group": exp.data_group, **(tags or {})})
    spec_path = write_spec(store.root / "adapter" / ".specs", key, spec)
    return AdapterPlan(key, spec.output_dir, spec_path, spec, data_version, base_model)


MACHINE_RANK_ENV = "SFTDAG_MACHINE_RANK"


def training_command(exp: Experiment, spec_path: Path) -> list[str]:
    """`python -m trainer.training.train SPEC`, or under `accelerate launch` for several processes,
    on this machine or on several (this machine's rank: $SFTDAG_MACHINE_RANK when set, else
    `training.machine_rank`, so one YAML serves every machine)."""
    tc = exp.training
    if tc.num_processes <= 1:
        return [sys.executable, "-m", "trainer.training.train", str(spec_path)]
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA trainer.training.train joins
    # the processes over gloo. (--cpu would start a single process without an MPI hostfile.) The machine
    # settings are passed explicitly: they win over an `accelerate config` file on the machine.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(tc.num_processes), "--num_machines", str(tc.num_machines), "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    if tc.num_machines > 1:
        command += ["--machine_rank", str(machine_rank(exp)), "--main_process_ip", str(tc.main_process_ip),
                    "--main_process_port", str(tc.main_process_port)]
    return command + ["-m", "trainer.training.train", str(spec_path)]


def machine_rank(exp: Experiment) -> int:
    value = os.environ.get(MACHINE_RANK_ENV, "").strip()
    if not value:
        return exp.training.machine_rank
    try:
        rank = int(value)
    except ValueError:
        raise ConfigError(f"{MACHINE_RANK_ENV}: {value!r} is not an integer machine rank") from None
    exp.training.check_machine_rank(rank, MACHINE_RANK_ENV)
    return rank


@dataclass
class MergePlan:
    """Merging an adapter and scoring the merged model, done by `python -m trainer.training.merge SPEC`."""

    key: str
    output_dir: Path
    score_path: Path  # keyed by what it measures: more held-out rows rescore, never retrain
    spec_path: Path

    def result(self) -> dict[str, Any]:
        return json.loads(self.score_path.read_text())

    @property
    def complete(self) -> bool:
        return self.score_path.is_file()

    def output(self) -> StageOutput:
        return Store(self.output_dir.parents[1]).publish("merged", self.key)


def plan_merge(exp: Experiment, adapter: StageOutput, tokenizer_dir: Path, held_out: Path | None) -> MergePlan:
    """Merge the finished `adapter` (received from its asset) and score the result on `held_out`."""
    summary = TrainingSummary.from_dict(adapter.manifest)
    key = content_key("merged", inputs=[adapter.key], params=keys.merged_params(exp))
    store_root = adapter.path.parents[1]
    output_dir = store_root / "merged" / key
    score_key = content_key("score", inputs=[key], params=keys.score_params(exp))
    spec = MergeSpec(adapter_dir=adapter.path, base_model=summary.base_model_path, tokenizer_dir=Path(tokenizer_dir),
                     output_dir=output_dir, score_path=output_dir.parent / ".scores" / f"{score_key}.json",
                     eot_token=summary.eot_token, held_out=held_out, accuracy_rows=exp.training.accuracy_rows,
                     max_new_tokens=exp.training.max_new_tokens,
                     versions={"adapter_version": adapter.key, "merged_version": key, "score_version": score_key})
    spec_path = write_spec(store_root / "merged" / ".specs", score_key, spec)
    return MergePlan(key, output_dir, spec.score_path, spec_path)


def merge_command(plan: MergePlan) -> list[str]:
    return [sys.executable, "-m", "trainer.training.merge", str(plan.spec_path)]
