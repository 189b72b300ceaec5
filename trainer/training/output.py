"""A training's output directory: work in `<output_dir>.partial`, finish by renaming.

Checkpoints live in the `.partial` dir; a restart resumes from the newest complete one. The
model, tokenizer and card are saved first, then `training_summary.json` atomically: its presence
marks the `.partial` dir as finished, and only then are the checkpoints deleted and the dir
renamed. A run stopped at any point either resumes from its last checkpoint or, on the next
start, is completed without training. A finished `output_dir` is never overwritten, and
`<output_dir>.lock` keeps a second concurrent training of the same output out.

With `training.keep_checkpoints` the summary lists the complete checkpoints the run left (those
`save_total_limit` did not rotate away), and finishing keeps each as `checkpoints/step-<N>/` in
the result, pruned to what loads the model at that step (LoRA: adapter_config.json and the
adapter weights; full: config and weights); optimizer, scheduler, RNG and trainer state go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator

from trainer.core.config import Experiment
from trainer.core.schemas import TRAINING_SUMMARY
from trainer.core.template_setup import TemplateSetup

MODEL_CARD = "README.md"
RUN_ID_FILE = "mlflow_run_id"  # the MLflow run a resumed training continues
COUNTERS_FILE = "sftdag_counters.json"  # token counters, saved into every checkpoint
# the base model's accuracy, which versions that scored it during training kept across a resume: a
# work dir they left may hold it
BEFORE_FILE = "sftdag_before.json"
BOOKKEEPING = (RUN_ID_FILE, BEFORE_FILE)  # in the work dir only, never in the result
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
KEPT_CHECKPOINTS = "checkpoints"  # in the result: checkpoints/step-<N>/ (training.keep_checkpoints)
# What a checkpoint's model loads from: PeftModel.from_pretrained(base, dir) for an adapter,
# AutoModelForCausalLM.from_pretrained(dir) for a full model. The rest only resumes training.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model-*-of-*.safetensors",
                "pytorch_model.bin", "pytorch_model-*-of-*.bin")
LOADABLE_FILES = WEIGHT_FILES + ("adapter_config.json", "config.json", "generation_config.json",
                                 "model.safetensors.index.json", "pytorch_model.bin.index.json")


def partial_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".partial")


def is_finished(work: Path) -> bool:
    """The summary is written last: a whole one marks the work finished (one cut short does not)."""
    try:
        return isinstance(json.loads((work / TRAINING_SUMMARY).read_text()), dict)
    except (OSError, ValueError):
        return False


def _complete_checkpoint(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(directory: str | Path) -> Path | None:
    """Newest `checkpoint-N` whose trainer_state.json (written last by Trainer) is readable."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for p in directory.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and _complete_checkpoint(p):
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", 0))


def kept_checkpoints(work: Path) -> list[dict[str, Any]]:
    """The complete checkpoints in `work`, as the summary lists them once kept:
    [{"step": N, "path": "checkpoints/step-N"}] by step. A checkpoint without model weights in a
    known format (which finishing would prune to nothing) is an error, not dropped."""
    found = []
    for p in work.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and _complete_checkpoint(p):
            if not any(fnmatch(f.name, pattern) for f in p.iterdir() for pattern in WEIGHT_FILES):
                raise RuntimeError(f"training.keep_checkpoints: {p} holds no model weights in a format that loads "
                                   f"with from_pretrained ({', '.join(WEIGHT_FILES)})")
            found.append(int(m.group(1)))
    return [{"step": step, "path": f"{KEPT_CHECKPOINTS}/step-{step}"} for step in sorted(found)]


def keep_checkpoint(work: Path, step: int, target: Path) -> None:
    """`checkpoint-<step>` → `target`, pruned to what loads the model. Re-entrant: pruning can be
    repeated and the rename is atomic, so a kill leaves either the checkpoint (pruned or not) or
    the target, and the next call finishes it."""
    if target.is_dir():
        return
    source = work / f"checkpoint-{step}"
    if not source.is_dir():
        raise RuntimeError(f"{work}: checkpoint-{step}, kept by {TRAINING_SUMMARY}, is gone; delete {work} "
                           f"to train again")
    for p in source.iterdir():
        if any(fnmatch(p.name, pattern) for pattern in LOADABLE_FILES):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    target.parent.mkdir(exist_ok=True)
    os.rename(source, target)


def remove_incomplete_checkpoints(work: Path) -> list[Path]:
    """Checkpoints a kill interrupted while they were written; returns what it removed."""
    removed = [p for p in work.glob("checkpoint-*") if p.is_dir() and not _complete_checkpoint(p)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


@contextmanager
def training_lock(output_dir: Path) -> Iterator[None]:
    """One training per output directory at a time (two would share the `.partial` dir)."""
    from filelock import FileLock, Timeout

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir.with_name(output_dir.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another process is already training {output_dir} (lock {lock.lock_file})") from None
    try:
        yield
    finally:
        lock.release()


def result_files(work: Path) -> list[Path]:
    """What the finished directory holds: not checkpoints, not bookkeeping."""
    return [p for p in sorted(work.iterdir()) if not CHECKPOINT_RE.match(p.name) and p.name not in BOOKKEEPING]


def save_model(trainer, work: Path, new_ids: list[int], is_main: bool) -> None:
    """Save the adapter (or full model: Trainer's own save, which knows sharded set-ups) into
    `work`. When peft trainable tokens cover every new token row, the resized embedding matrices
    are NOT saved in the adapter (peft would otherwise copy whole embedding and lm_head matrices
    because the vocabulary grew): loading the adapter onto the resized base overwrites exactly
    those rows, so the adapter stays small and exact."""
    model = unwrap(trainer.model)
    if not hasattr(model, "peft_config"):
        trainer.save_model(str(work))
        return
    if not is_main:
        return
    cfg = model.peft_config[model.active_adapter]
    covered = cfg.trainable_token_indices or {}
    if isinstance(covered, list):
        covered = {"embed_tokens": covered}
    all_covered = bool(new_ids) and bool(covered) and all(set(new_ids) <= set(ids) for ids in covered.values())
    model.save_pretrained(str(work), save_embedding_layers=False if all_covered else "auto")


def unwrap(model):
    """The model inside a distributed wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def finalize(work: Path, output_dir: Path) -> None:
    """Finished work (summary written) → the output directory. Checkpoints are deleted only now,
    after the summary: a kill at any point before this resumes from them, and a kill during
    this completes on the next run (it only prunes, deletes and renames). The checkpoints the
    summary keeps are moved into place before the others are deleted."""
    for kept in json.loads((work / TRAINING_SUMMARY).read_text()).get("checkpoints") or []:
        keep_checkpoint(work, kept["step"], work / kept["path"])
    for p in work.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    for name in BOOKKEEPING:
        (work / name).unlink(missing_ok=True)
    os.rename(work, output_dir)


def model_card(experiment: Experiment, setup: TemplateSetup, summary, spec) -> str:
    """README.md of the result: base, data, settings and metrics (summary: a TrainingSummary)."""
    tc = experiment.training
    lc = tc.lora
    lines = [
        f"# {experiment.name}: {'adapter' if tc.mode != 'full' else 'model'} ({tc.mode})",
        "",
        "Trained by sftdag (`python -m trainer.training.train`).",
        "",
        "## Base model and data",
        f"- base model: `{experiment.model.base}` (loaded from `{summary.base_model_path}`)",
        f"- tokenizer: `{spec.tokenizer_dir}` ({summary.vocab_size} tokens; "
        f"added: {', '.join(setup.added_tokens) or 'none'})",
        f"- end-of-turn text: `{setup.eot_token}`",
        f"- train shards: `{spec.train_shards}` ({summary.train_rows} packed rows)",
        f"- eval shards: `{spec.eval_shards}`",
    ]
    for key, value in sorted(spec.tags.items()):
        lines.append(f"- {key}: `{value}`")
    lines += [
        "",
        "## Settings",
        f"- mode: {tc.mode}" + (f", LoRA r={lc.r} alpha={lc.alpha} dropout={lc.dropout} "
                                 f"targets={lc.target_modules} rslora={lc.use_rslora} bias={lc.bias}"
                                 if tc.mode != "full" else ""),
        f"- learning rate {tc.learning_rate} ({tc.lr_scheduler_type}, warmup steps {tc.warmup_steps}, "
        f"ratio {tc.warmup_ratio}), weight decay {tc.weight_decay}, max grad norm {tc.max_grad_norm}",
        f"- epochs {tc.num_train_epochs}, max steps {tc.max_steps}, per-device batch "
        f"{tc.per_device_train_batch_size} x grad accumulation {tc.gradient_accumulation_steps} x "
        f"{summary.world_size} processes",
        f"- bf16 {tc.bf16}, fp16 {tc.fp16}, gradient checkpointing {tc.gradient_checkpointing}, "
        f"NEFTune {tc.neftune_noise_alpha}, seed {tc.seed}",
        "",
        "## Metrics",
    ]
    for key in ("global_step", "train_loss", "eval_loss", "trainable_tokens", "tokens", "train_runtime"):
        if getattr(summary, key) is not None:
            lines.append(f"- {key}: {getattr(summary, key)}")
    if summary.mlflow_run_id:
        lines.append(f"- MLflow run: `{summary.mlflow_run_id}` ({summary.mlflow_tracking_uri})")
    if summary.checkpoints:
        loads = ("`AutoModelForCausalLM.from_pretrained(dir)`" if tc.mode == "full"
                 else "`PeftModel.from_pretrained(base, dir)`, on the base resized to the tokenizer")
        lines += ["", "## Checkpoints", f"Kept (`training.keep_checkpoints`), each loading like the final "
                  f"{'model' if tc.mode == 'full' else 'adapter'}: {loads}."]
        lines += [f"- step {c['step']}: `{c['path']}`" for c in summary.checkpoints]
    return "\n".join(lines) + "\n"
