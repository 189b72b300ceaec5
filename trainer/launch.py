"""Plans for the training stages: adapter and merged-model keys, the run spec, the launch command.

Nothing here trains: `trainer.train` does, in its own process (so a crash cannot take the
orchestrator with it), and `trainer.merge` merges. This module decides *what* to train, where
the result goes, and whether it already exists.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import keys
from .config import Experiment
from .prepare import DataPipeline
from .store import CODE_VERSIONS, StageOutput, content_key, file_digest

SUMMARY_FILE = "training_summary.json"


def model_identity(exp: Experiment, resolved_base: str) -> dict[str, Any]:
    """What identifies the base weights: file contents for a local model, id+revision for the hub."""
    base = Path(resolved_base)
    if base.is_dir():
        files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        return {"local": [[p.name, file_digest(p)] for p in files]}
    return {"hub": exp.model.base, "revision": exp.model.revision}


@dataclass
class AdapterPlan:
    key: str
    output_dir: Path
    spec_path: Path
    spec: dict[str, Any]
    data_version: str
    base_model: str

    @property
    def complete(self) -> bool:
        return (self.output_dir / SUMMARY_FILE).is_file()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.output_dir / SUMMARY_FILE).read_text())


def plan_adapter(exp: Experiment, data: dict[str, StageOutput] | None = None,
                 tags: dict[str, str] | None = None) -> AdapterPlan:
    """What to train: from the data stages' outputs (a Dagster asset receives them), or, without
    them, from running the data stages (every one a cache hit once prepared)."""
    from .models import resolve_base_model

    pipeline = DataPipeline(exp, progress=False)
    store = pipeline.store
    outputs = data if data is not None else pipeline.run()
    tokenizer = outputs["tokenizer"].manifest
    setup = tokenizer["template"]
    base_vocab = tokenizer["vocab_size"] - len(setup["added_tokens"])
    base_model = resolve_base_model(exp.model, store.root, base_vocab)

    train_key = outputs["packed/train"].key
    eval_key = outputs["packed/eval"].key if "packed/eval" in outputs else None
    data_version = train_key + (f"+{eval_key}" if eval_key else "")
    params = keys.adapter_params(exp, model_identity(exp, base_model), tokenizer["identity"])
    key = content_key("adapter", inputs=[k for k in (train_key, eval_key) if k], params=params)
    output_dir = store.path("adapter", key)

    spec = {
        "experiment": {**exp.to_dict(), "base_dir": exp.base_dir},
        "train_shards": str(outputs["packed/train"].path),
        "eval_shards": str(outputs["packed/eval"].path) if eval_key else None,
        "tokenizer_dir": str(outputs["tokenizer"].path),
        "base_model": base_model,
        "template": {"added_tokens": list(setup["added_tokens"]), "eot_token": setup["eot_token"]},
        "held_out": str(outputs["templated/eval"].path / "held_out.jsonl") if eval_key else None,
        "output_dir": str(output_dir),
        "tags": {"data_version": data_version, "adapter_version": key, "experiment": exp.name,
                 "raw_version": "+".join(outputs[f"raw/{split}"].key for split in pipeline.splits()),
                 "data_group": exp.data_group, **(tags or {})},
    }
    spec_dir = store.root / "adapter" / ".specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec_path = spec_dir / f"{key}.json"
    # Atomic: a training process of a concurrent materialization may be reading it.
    tmp = spec_dir / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, spec_path)
    return AdapterPlan(key, output_dir, spec_path, spec, data_version, base_model)


def raw_version(pipeline: DataPipeline) -> str:
    """The raw data's version over all splits: what scheduled retraining compares."""
    return "+".join(pipeline.raw_key(split) for split in pipeline.splits())


def training_command(exp: Experiment, spec_path: Path) -> list[str]:
    """`python -m trainer.train SPEC`, or under `accelerate launch` for several processes."""
    n = exp.training.num_processes
    if n <= 1:
        return [sys.executable, "-m", "trainer.train", str(spec_path)]
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA trainer.train joins
    # the processes over gloo. (--cpu would start a single process without an MPI hostfile.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + ["-m", "trainer.train", str(spec_path)]


@dataclass
class MergePlan:
    key: str
    output_dir: Path


def plan_merge(exp: Experiment, adapter: AdapterPlan) -> MergePlan:
    key = content_key("merged", inputs=[adapter.key], params=keys.merged_params(exp))
    store_root = adapter.output_dir.parents[1]
    return MergePlan(key, store_root / "merged" / key)


def run_merge(exp: Experiment, adapter: AdapterPlan, plan: MergePlan) -> dict[str, Any]:
    """Merge (if not already merged) and score the merged model on the held-out prompts."""
    from .merge import merge_adapter

    if not plan.output_dir.is_dir():  # merge_adapter renames a complete directory into place
        merge_adapter(str(adapter.output_dir), adapter.base_model, adapter.spec["tokenizer_dir"],
                      str(plan.output_dir), adapter.spec["template"]["eot_token"])
    # The score is keyed by what it measures: asking for more held-out rows rescores, never retrains.
    score_key = content_key("score", inputs=[plan.key], params=keys.score_params(exp))
    summary_path = plan.output_dir / f"score-{score_key}.json"
    if not summary_path.is_file():
        summary = {"adapter_version": adapter.key, "merged_version": plan.key, "score_version": score_key}
        if adapter.spec.get("held_out"):
            summary["accuracy_merged"], summary["scored_rows"] = score_model(plan.output_dir, adapter.spec, exp)
        tmp = summary_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, summary_path)
    return json.loads(summary_path.read_text())


def score_model(model_dir: Path, spec: dict[str, Any], exp: Experiment) -> tuple[float, int]:
    """Held-out exact match of the model in `model_dir`, and how many rows were scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import exact_match, generate, load_held_out

    rows = load_held_out(spec["held_out"])[: exp.training.accuracy_rows]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    stops = [t for t in (spec["template"].get("eot_token"), tokenizer.eos_token) if t]
    with torch.no_grad():
        generations = generate(model, tokenizer, [r["prompt"] for r in rows], exp.training.max_new_tokens,
                               stop_tokens=stops)
    return exact_match(generations, [r["reference"] for r in rows]), len(rows)

