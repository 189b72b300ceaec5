"""Training entry point: `python -m trainer.training.train SPEC.json`, also under
`accelerate launch --multi_gpu --num_processes N -m trainer.training.train SPEC.json` (or `torchrun
--nproc_per_node N -m trainer.training.train SPEC.json`). On a machine without a GPU the same command runs
N CPU processes over gloo. Note: `accelerate launch --cpu --num_processes N` starts ONE process
(accelerate's simple launcher; it needs an MPI hostfile for more).

Runs where only torch, transformers, peft, accelerate and pyarrow (and pyyaml, a transformers
dependency) are installed: MLflow and Dagster Pipes are used when importable, never required.

SPEC.json
---------
```
{
  "experiment":    Experiment.to_dict() plus "base_dir" (the YAML's folder, for relative paths),
  "train_shards":  directory of packed shard-*.arrow files (input_ids, labels, seq_lengths),
  "eval_shards":   directory of packed eval shards, or null,
  "tokenizer_dir": the tokenizer the data stage used (save_pretrained dir, chat template and
                   added special tokens included, and its `template_setup.json`: end-of-turn
                   text and the tokens the set-up added),
  "held_out":      JSONL of {"prompt": generation prompt text (template + bos included),
                   "reference": str}, or null,
  "output_dir":    where the finished adapter (or full model) goes,
  "base_model":    optional: the already resolved base model (path or hub id); when absent it is
                   resolved from experiment.model (builtin:tiny-llama is built into the store),
  "tags":          {str: str} — MLflow tags (Dagster run id, data version, ...); "adapter_version"
                   becomes the Pipes data_version
}
```

Output (`output_dir`, written as `output_dir + ".partial"` and renamed when complete):
`adapter_config.json` + `adapter_model.safetensors` (LoRA/QLoRA; new-token rows are part of the
adapter) or `config.json` + `model.safetensors` (full), the tokenizer files, `README.md` (model
card), `training_summary.json` (mlflow_run_id, global_step, train_loss, eval_loss,
accuracy_before, accuracy_after, trainable_tokens, tokens, train_runtime, steps_per_epoch, ...).
Checkpoints live in the `.partial` dir; a restart resumes from the newest complete one (same
MLflow run, token counters restored). The model, tokenizer and card are saved first, then
`training_summary.json` atomically: its presence marks the `.partial` dir as finished, and only
then are the checkpoints deleted and the dir renamed, so a run stopped at any point either resumes
from its last checkpoint or, on the next start, is completed without training (its MLflow run
closed, no new one). A finished `output_dir` is never overwritten (the run is a no-op that reports
the existing summary). `output_dir + ".lock"` keeps a second concurrent
training of the same output out.

Batches: packed rows with restarting position_ids and a block-diagonal 4-D mask (see
`trainer.training.collate`); a batch without any trainable token raises `NoTrainableTokensError` naming its
dataset rows, and a non-finite loss raises `FloatingPointError` (Trainer would otherwise quietly
replace it). MLflow (rank 0): `experiment.tracking.mlflow_tracking_uri`, else
`sqlite:///<store>/mlflow.db` with artifacts in `<store>/mlartifacts` (see `trainer.training.tracking`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from trainer.training.collate import (
    NoTrainableTokensError,  # noqa: F401  (re-exported: the error a bad batch raises)
    PackedCollator,
    PackedDataset,
    model_inputs,
    steps_per_epoch,
)
from trainer.core.config import Experiment, experiment_from_dict
from trainer.core.schemas import IGNORE_INDEX, TRAINING_SUMMARY
from trainer.data.templating import load_template_setup
from trainer.training.models import embedding_rows, load_model, resolve_base_model

log = logging.getLogger("sftdag.train")

MODEL_CARD = "README.md"
RUN_ID_FILE = "mlflow_run_id"
COUNTERS_FILE = "sftdag_counters.json"
BEFORE_FILE = "sftdag_before.json"  # accuracy of the base model, kept across a resume
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL_METRICS = ("train_loss", "train_runtime")  # logged once, from the summary

__all__ = [
    "main", "run_training", "load_spec", "partial_dir", "last_checkpoint", "steps_per_epoch",
    "base_vocab_size", "new_token_modules", "SpecError",
]


class SpecError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Spec and paths
# --------------------------------------------------------------------------------------------

def load_spec(path_or_dict: str | Path | dict) -> dict[str, Any]:
    spec = dict(path_or_dict) if isinstance(path_or_dict, dict) else json.loads(Path(path_or_dict).read_text())
    for key in ("experiment", "train_shards", "tokenizer_dir", "output_dir"):
        if not spec.get(key):
            raise SpecError(f"spec: {key!r} is required")
    spec.setdefault("eval_shards", None)
    spec.setdefault("held_out", None)
    spec.setdefault("tags", {})
    return spec


def spec_experiment(spec: dict[str, Any]) -> Experiment:
    raw = dict(spec["experiment"])
    base_dir = raw.pop("base_dir", ".")
    return experiment_from_dict(raw, base_dir=base_dir)


def partial_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".partial")


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


def base_vocab_size(tokenizer, added_tokens: list[str]) -> int:
    """The tokenizer's vocabulary before the data stage added its special tokens: trailing ids
    that belong to `added_tokens` are not part of the base (a builtin model is built without
    them, so they exercise the resize + train-new-rows path like a real base model would)."""
    n = len(tokenizer)
    added_ids = set()
    for tok in added_tokens or []:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            added_ids.add(tid)
    while n - 1 in added_ids:
        n -= 1
    return n


# --------------------------------------------------------------------------------------------
# Optional reporting back-ends
# --------------------------------------------------------------------------------------------

class Reporter:
    """Rank-0 reporting: logging always, Dagster Pipes and MLflow when available."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.pipes = None
        self.mlflow = None
        if not is_main or not os.environ.get("DAGSTER_PIPES_CONTEXT"):
            return
        try:
            from dagster_pipes import open_dagster_pipes
        except ImportError:
            log.warning("DAGSTER_PIPES_CONTEXT is set but dagster_pipes is not installed: not reporting to Dagster")
            return
        self.pipes = open_dagster_pipes()

    def info(self, msg: str, *args: Any) -> None:
        self._emit("info", msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._emit("warning", msg, *args)

    def _emit(self, level: str, msg: str, *args: Any) -> None:
        if not self.is_main:
            return
        text = msg % args if args else msg
        getattr(log, level)(text)
        if self.pipes is not None:
            try:
                getattr(self.pipes.log, level)(text)
            except Exception as e:  # pragma: no cover - never fail training over a log line
                log.warning("pipes log failed: %s", e)

    def materialization(self, metadata: dict[str, Any], data_version: str | None) -> None:
        if self.pipes is None:
            return
        clean = {k: v for k, v in metadata.items() if isinstance(v, (int, float, str, bool)) and v is not None}
        try:
            self.pipes.report_asset_materialization(metadata=clean, data_version=data_version)
        except Exception as e:  # e.g. launched by an op with no asset in scope
            self.warning("could not report the materialization to Dagster: %s", e)

    def close(self) -> None:
        if self.pipes is not None:
            self.pipes.close()
            self.pipes = None


def _open_mlflow(experiment: Experiment, spec: dict, work: Path, reporter: Reporter):
    try:
        from trainer.training.tracking import MlflowRun, flatten, resolve_tracking
    except ImportError:  # pragma: no cover
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        reporter.warning("mlflow is not installed: not tracking this run")
        return None
    uri, name, artifact_location = resolve_tracking(experiment)
    run_id_path = work / RUN_ID_FILE
    run_id = run_id_path.read_text().strip() if run_id_path.exists() else None
    tags = {str(k): str(v) for k, v in (spec.get("tags") or {}).items()}
    tags["sftdag.output_dir"] = str(spec["output_dir"])
    run = MlflowRun(uri, name, artifact_location, run_name=Path(spec["output_dir"]).name, tags=tags,
                    run_id=run_id)
    if run_id is None:
        run_id_path.write_text(run.run_id)
    else:
        run.set_tags(tags)
        reporter.info("continuing MLflow run %s", run.run_id)
    params = flatten(experiment.to_dict())
    params["base_dir"] = experiment.base_dir
    for key in ("train_shards", "eval_shards", "tokenizer_dir", "held_out", "output_dir"):
        params[f"spec.{key}"] = str(spec.get(key))
    run.log_params(params)
    reporter.info("MLflow: run %s in experiment %r at %s", run.run_id, name, uri)
    return run


# --------------------------------------------------------------------------------------------
# Distributed generation helpers
# --------------------------------------------------------------------------------------------

def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def distributed_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, stop_tokens: list,
                         batch_size: int = 16) -> list[str]:
    """Greedy generations for `prompts`, split over all ranks and gathered in order (every rank
    must call this)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from trainer.training.evaluate import generate

    state = PartialState()
    if state.num_processes == 1:
        return generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, stop_tokens=stop_tokens)
    with state.split_between_processes(list(prompts)) as mine:
        outs = generate(model, tokenizer, mine, max_new_tokens, batch_size=batch_size, stop_tokens=stop_tokens)
    return list(gather_object(outs))


# --------------------------------------------------------------------------------------------
# Trainer subclass + callbacks
# --------------------------------------------------------------------------------------------

def _make_trainer_class():
    from transformers import Trainer

    class PackedTrainer(Trainer):
        """Trainer over packed batches: converts the block-diagonal mask for the model's attention
        implementation, counts tokens, and refuses non-finite losses (naming the rows)."""

        token_counter: "TokenCounter | None" = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rows = inputs.get("row_index")
            labels = inputs.get("labels")
            if labels is not None and model.training and self.token_counter is not None:
                self.token_counter.add(labels, inputs.get("row_length"))
            prepared = model_inputs(inputs, self.model)
            result = super().compute_loss(model, prepared, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            loss = result[0] if return_outputs else result
            if labels is not None and not torch.isfinite(loss.detach()).all():
                trainable = int((labels != IGNORE_INDEX).sum())
                raise FloatingPointError(
                    f"non-finite loss {loss.detach().float().item()} on dataset rows "
                    f"{rows.tolist() if rows is not None else '?'} ({trainable} trainable tokens in the batch)")
            return result

    return PackedTrainer


class TokenCounter:
    """Real (non-padding) tokens and trainable tokens, summed over ranks once per optimizer step."""

    def __init__(self):
        self._local = [0, 0]
        self.tokens = 0
        self.trainable_tokens = 0

    def add(self, labels: torch.Tensor, row_length: torch.Tensor | None) -> None:
        # Sums stay on the device until `reduce` (one host sync per optimizer step, not per batch).
        real = row_length.sum() if row_length is not None else labels.numel()
        self._local[0] = self._local[0] + real
        self._local[1] = self._local[1] + (labels != IGNORE_INDEX).sum()

    def reduce(self, accelerator) -> None:
        local = torch.stack([torch.as_tensor(v).double().cpu() for v in self._local])
        if accelerator is not None and accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
        self.tokens += int(local[0])
        self.trainable_tokens += int(local[1])
        self._local = [0, 0]

    def state(self) -> dict[str, int]:
        return {"tokens": self.tokens, "trainable_tokens": self.trainable_tokens}

    def load(self, path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        self.tokens = int(data.get("tokens", 0))
        self.trainable_tokens = int(data.get("trainable_tokens", 0))
        return True


def _make_callback_class():
    from transformers import TrainerCallback

    class ReportingCallback(TrainerCallback):
        """Per-step metrics to MLflow/Pipes (rank 0), sample generations at each evaluation, token
        counters saved into every checkpoint."""

        def __init__(self, *, reporter: Reporter, run, counter: TokenCounter, tokenizer, samples: list[dict],
                     stop_tokens: list, max_new_tokens: int, sample_strategy: str, sample_steps: int | None,
                     has_eval: bool):
            self.trainer = None
            self.reporter = reporter
            self.run = run
            self.counter = counter
            self.tokenizer = tokenizer
            self.samples = samples
            self.stop_tokens = stop_tokens
            self.max_new_tokens = max_new_tokens
            self.sample_strategy = sample_strategy
            self.sample_steps = sample_steps
            self.has_eval = has_eval
            self._last_time = None
            self._last_tokens = 0

        # -- counters ------------------------------------------------------------------------
        def on_train_begin(self, args, state, control, **kwargs):
            self._last_time = time.time()
            self._last_tokens = self.counter.tokens

        def on_step_end(self, args, state, control, **kwargs):
            self.counter.reduce(self.trainer.accelerator if self.trainer is not None else None)
            if (not self.has_eval and self.sample_strategy == "steps" and self.sample_steps
                    and state.global_step % self.sample_steps == 0):
                self.log_samples(state.global_step)

        def on_epoch_end(self, args, state, control, **kwargs):
            if not self.has_eval and self.sample_strategy == "epoch":
                self.log_samples(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    (folder / COUNTERS_FILE).write_text(json.dumps(self.counter.state()))
                    self.reporter.info("checkpoint saved: %s", folder.name)

        # -- metrics ---------------------------------------------------------------------------
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            # train_loss and train_runtime are logged once, at the end, over the whole run: Trainer's
            # own (in its last log) cover only this session when it resumed.
            metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in FINAL_METRICS}
            if "loss" in metrics or "grad_norm" in metrics:
                now = time.time()
                if self._last_time is not None and now > self._last_time:
                    metrics["tokens_per_second"] = (self.counter.tokens - self._last_tokens) / (now - self._last_time)
                self._last_time, self._last_tokens = now, self.counter.tokens
                metrics["trainable_tokens"] = self.counter.trainable_tokens
                metrics["tokens"] = self.counter.tokens
                self.reporter.info(
                    "step %d/%d loss %s lr %s grad_norm %s tokens/s %s trainable tokens %d",
                    state.global_step, state.max_steps, _fmt(metrics.get("loss")), _fmt(metrics.get("learning_rate")),
                    _fmt(metrics.get("grad_norm")), _fmt(metrics.get("tokens_per_second"), ".0f"),
                    self.counter.trainable_tokens)
            elif "eval_loss" in metrics:
                self.reporter.info("step %d eval_loss %s", state.global_step, _fmt(metrics["eval_loss"]))
            if self.run is not None:
                self.run.log_metrics(metrics, step=state.global_step)

        # -- samples -----------------------------------------------------------------------------
        def on_evaluate(self, args, state, control, **kwargs):
            self.log_samples(state.global_step)

        def log_samples(self, step: int, name: str | None = None) -> list[str]:
            if not self.samples or self.trainer is None:
                return []
            prompts = [s["prompt"] for s in self.samples]
            gens = distributed_generate(self.trainer.model, self.tokenizer, prompts, self.max_new_tokens,
                                        self.stop_tokens)
            if self.reporter.is_main and self.run is not None:
                self.run.log_table(
                    {"step": [step] * len(prompts), "prompt": prompts, "generation": gens,
                     "reference": [s["reference"] for s in self.samples]},
                    artifact_file=f"samples/{name or f'step_{step:06d}'}.json")
            return gens

    return ReportingCallback


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


# --------------------------------------------------------------------------------------------
# Model set-up
# --------------------------------------------------------------------------------------------

def check_mode_available(mode: str) -> None:
    """QLoRA needs bitsandbytes and CUDA: fail before any work when they are missing."""
    if mode not in ("qlora4", "qlora8"):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(f"training.mode {mode}: bitsandbytes is not installed (pip install bitsandbytes); "
                           "use mode lora or full on this machine") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"training.mode {mode}: bitsandbytes quantization needs a CUDA GPU and none is available; "
                           "use mode lora or full on this machine")


def new_token_modules(model, new_ids: list[int]) -> dict[str, list[int]]:
    """{module name: new token ids} for the input embedding and an untied output projection."""
    names = {}
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is None or out.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if module is emb:
            names["input"] = name.rsplit(".", 1)[-1]
        elif out is not None and module is out and not tied:
            names["output"] = name.rsplit(".", 1)[-1]
    return {n: list(new_ids) for n in names.values()}


def apply_lora(model, experiment: Experiment, new_ids: list[int], reporter: Reporter):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    lc = experiment.training.lora
    if lc.init_adapter:
        path = experiment.resolve_path(lc.init_adapter)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"training.lora.init_adapter: no adapter_config.json in {path}")
        reporter.info("continuing training of the adapter in %s", path)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        if new_ids:
            cfg = model.peft_config["default"]
            covered = cfg.trainable_token_indices or {}
            saved = set(cfg.modules_to_save or [])
            if not covered and not {"embed_tokens", "lm_head"} & saved:
                reporter.warning("the tokenizer added %d tokens but adapter %s does not train new embedding rows",
                                 len(new_ids), path)
        return model

    user_saved = list(lc.modules_to_save or [])
    kwargs: dict[str, Any] = dict(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        use_rslora=lc.use_rslora, bias=lc.bias, modules_to_save=user_saved or None, task_type="CAUSAL_LM",
    )
    token_modules = {k: v for k, v in new_token_modules(model, new_ids).items() if k not in user_saved} if new_ids else {}
    if token_modules:
        try:
            peft_model = get_peft_model(model, PeftLoraConfig(**kwargs, trainable_token_indices=token_modules))
            reporter.info("training the %d new token rows (ids %d..%d) of %s through peft trainable_token_indices",
                          len(new_ids), new_ids[0], new_ids[-1], ", ".join(token_modules))
            return peft_model
        except (ValueError, TypeError, NotImplementedError, KeyError) as e:
            reporter.warning("peft trainable_token_indices failed (%s); training whole %s via modules_to_save",
                             e, ", ".join(token_modules))
            kwargs["modules_to_save"] = user_saved + [m for m in token_modules if m not in user_saved]
    return get_peft_model(model, PeftLoraConfig(**kwargs))


def added_token_ids(tokenizer, added_tokens: list[str]) -> list[int]:
    """The ids of the tokens the data stage's template set-up added (new special tokens)."""
    ids = set()
    for token in added_tokens or []:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def build_model(experiment: Experiment, tokenizer, base_path: str, added_tokens: list[str], reporter: Reporter,
                device):
    tc = experiment.training
    extra: dict[str, Any] = {}
    if tc.mode in ("qlora4", "qlora8"):
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if tc.bf16 else torch.float16
        if tc.mode == "qlora4":
            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True)
        else:
            extra["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        extra["device_map"] = {"": device}
    model = load_model(base_path, experiment.model, None, **extra)
    base_rows = embedding_rows(model)
    from trainer.training.models import resize_for_tokenizer

    added = resize_for_tokenizer(model, tokenizer)
    # The new tokens are those the set-up added, wherever their rows are: a base model whose
    # vocabulary is padded past the tokenizer (Qwen2.5, Phi-2, Pythia) grows nothing, yet the
    # rows of the new ids were never trained and must be.
    new_ids = added_token_ids(tokenizer, added_tokens)
    if added:
        reporter.info("tokenizer has %d tokens, base model %d rows: resized embeddings by %d rows",
                      len(tokenizer), base_rows, added)
    if new_ids:
        reporter.info("the %d tokens the template set-up added (ids %s) will be trained", len(new_ids),
                      ", ".join(map(str, new_ids)))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if tc.mode == "full":
        if "quantization_config" not in extra:
            model.to(device)
        return model, base_rows, new_ids
    if tc.mode in ("qlora4", "qlora8"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=tc.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.to(device)
    model = apply_lora(model, experiment, new_ids, reporter)
    return model, base_rows, new_ids


def training_arguments(experiment: Experiment, work: Path, has_eval: bool):
    from transformers import TrainingArguments

    tc = experiment.training
    # transformers 5 takes the ratio as a float < 1 in warmup_steps.
    warmup: float = tc.warmup_steps if tc.warmup_steps else float(tc.warmup_ratio)
    if not tc.warmup_steps and not 0.0 <= warmup < 1.0:
        raise ValueError(f"training.warmup_ratio must be in [0, 1), got {tc.warmup_ratio}")
    return TrainingArguments(
        output_dir=str(work),
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler_type,
        warmup_steps=warmup,
        num_train_epochs=tc.num_train_epochs,
        max_steps=tc.max_steps,
        per_device_train_batch_size=tc.per_device_train_batch_size,
        per_device_eval_batch_size=tc.per_device_eval_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        bf16=tc.bf16,
        fp16=tc.fp16,
        gradient_checkpointing=tc.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if tc.gradient_checkpointing else None,
        neftune_noise_alpha=tc.neftune_noise_alpha,
        seed=tc.seed,
        data_seed=tc.seed,
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        eval_strategy=tc.eval_strategy if has_eval else "no",
        eval_steps=tc.eval_steps,
        save_strategy=tc.save_strategy,
        save_steps=tc.save_steps,
        save_total_limit=tc.save_total_limit,
        logging_steps=tc.logging_steps,
        remove_unused_columns=False,
        report_to="none",
        label_names=["labels"],
        prediction_loss_only=True,
        dataloader_num_workers=0,
        use_cpu=use_cpu(),
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def model_card(experiment: Experiment, spec: dict, summary: dict, base_path: str) -> str:
    setup = load_template_setup(spec["tokenizer_dir"])
    tc = experiment.training
    lc = tc.lora
    tags = spec.get("tags") or {}
    lines = [
        f"# {experiment.name}: {'adapter' if tc.mode != 'full' else 'model'} ({tc.mode})",
        "",
        "Trained by sftdag (`python -m trainer.training.train`).",
        "",
        "## Base model and data",
        f"- base model: `{experiment.model.base}` (loaded from `{base_path}`)",
        f"- tokenizer: `{spec['tokenizer_dir']}` ({summary.get('vocab_size')} tokens; "
        f"added: {', '.join(setup.added_tokens) or 'none'})",
        f"- end-of-turn text: `{setup.eot_token}`",
        f"- train shards: `{spec['train_shards']}` ({summary.get('train_rows')} packed rows)",
        f"- eval shards: `{spec.get('eval_shards')}`",
    ]
    for key, value in sorted(tags.items()):
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
        f"{summary.get('world_size')} processes",
        f"- bf16 {tc.bf16}, fp16 {tc.fp16}, gradient checkpointing {tc.gradient_checkpointing}, "
        f"NEFTune {tc.neftune_noise_alpha}, seed {tc.seed}",
        "",
        "## Metrics",
    ]
    for key in ("global_step", "train_loss", "eval_loss", "accuracy_before", "accuracy_after",
                "trainable_tokens", "tokens", "train_runtime"):
        if summary.get(key) is not None:
            lines.append(f"- {key}: {summary[key]}")
    if summary.get("mlflow_run_id"):
        lines.append(f"- MLflow run: `{summary['mlflow_run_id']}` ({summary.get('mlflow_tracking_uri')})")
    return "\n".join(lines) + "\n"


def _full_train_loss(trainer, resumed_step: int, session_loss: float) -> float:
    """Mean loss over the whole run, also when this session resumed after `resumed_step` steps."""
    if not resumed_step:
        return session_loss
    total, steps, prev = 0.0, 0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry and entry["step"] <= resumed_step:
            total += entry["loss"] * (entry["step"] - prev)
            steps += entry["step"] - prev
            prev = entry["step"]
    session_steps = trainer.state.global_step - resumed_step
    if steps == 0:
        return session_loss
    return (total + session_loss * session_steps) / (steps + session_steps)


def save_final_model(trainer, work: Path, new_ids: list[int], is_main: bool) -> None:
    """Save the adapter (or full model) into `work`. When peft trainable tokens cover every new
    token row, the resized embedding matrices are NOT saved in the adapter (peft would otherwise
    copy whole embedding and lm_head matrices because the vocabulary grew): loading the adapter onto
    the resized base overwrites exactly those rows, so the adapter stays small and exact."""
    model = _unwrap(trainer.model)
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


def _write_summary(work: Path, summary: dict) -> None:
    """Atomically: the summary's presence marks `work` as finished (see `_finalize`)."""
    tmp = work / f".{TRAINING_SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, work / TRAINING_SUMMARY)


def _finalize(work: Path, output_dir: Path) -> None:
    """Finished work (summary written) → the output directory. Checkpoints are deleted only now,
    after the summary: a kill at any point before this resumes from them, and a kill during
    this completes on the next run (it only deletes and renames)."""
    for p in work.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    for name in (RUN_ID_FILE, BEFORE_FILE):
        (work / name).unlink(missing_ok=True)
    os.rename(work, output_dir)


def _end_mlflow_run_of(work: Path, experiment: Experiment, reporter: "Reporter") -> None:
    """A run killed after its summary was written left its MLflow run open: close it."""
    run_id_path = work / RUN_ID_FILE
    if not run_id_path.exists():
        return
    try:
        from trainer.training.tracking import MlflowRun, resolve_tracking

        uri, name, artifact_location = resolve_tracking(experiment)
        run = MlflowRun(uri, name, artifact_location, run_id=run_id_path.read_text().strip())
        run.log_artifact(work / TRAINING_SUMMARY)
        run.end("FINISHED")
    except Exception as e:  # tracking must never stop the completion
        reporter.warning("could not close the MLflow run of %s: %s", work, e)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def run_training(spec_or_path: str | Path | dict) -> dict[str, Any]:
    """Train as the spec says; returns the training summary (on every rank)."""
    spec = load_spec(spec_or_path)
    experiment = spec_experiment(spec)
    tc = experiment.training
    output_dir = Path(spec["output_dir"]).expanduser().resolve()
    work = partial_dir(output_dir)

    from accelerate import PartialState

    state = PartialState(cpu=use_cpu())
    is_main = state.is_main_process

    if output_dir.exists():
        summary = _read_summary(output_dir)
        if is_main:
            print(f"sftdag: {output_dir} is already complete; not training again", flush=True)
            reporter = Reporter(True)
            try:
                reporter.info("%s is already complete (step %s); not training again", output_dir,
                              summary.get("global_step"))
                reporter.materialization({**summary, "output_dir": str(output_dir), "cached": True},
                                         (spec.get("tags") or {}).get("adapter_version"))
            finally:
                reporter.close()
        return summary

    reporter = Reporter(is_main)
    exc_info = (None, None, None)
    try:
        check_mode_available(tc.mode)
        return _run(spec, experiment, output_dir, work, state, reporter)
    except BaseException:
        exc_info = sys.exc_info()
        if reporter.mlflow is not None:
            try:
                reporter.mlflow.end("FAILED")
            except Exception:  # pragma: no cover
                pass
        raise
    finally:
        if reporter.pipes is not None:
            reporter.pipes.__exit__(*exc_info)
            reporter.pipes = None


def use_cpu() -> bool:
    """Train on CPU processes: asked for (ACCELERATE_USE_CPU), or several processes and no GPU.

    accelerate only sets up a multi-process CPU group (gloo) when told `cpu=True`; without it a
    torchrun/`accelerate launch --multi_gpu` job on a CPU machine would run N independent copies.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _read_summary(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / TRAINING_SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


def _run(spec: dict, experiment: Experiment, output_dir: Path, work: Path, state, reporter: Reporter) -> dict:
    lock = None
    if state.is_main_process:
        lock = _acquire_lock(output_dir)
    try:
        return _run_locked(spec, experiment, output_dir, work, state, reporter)
    finally:
        if lock is not None:
            lock.release()


def _acquire_lock(output_dir: Path):
    """One training per output directory at a time (two would share the `.partial` dir)."""
    from filelock import FileLock, Timeout

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir.with_name(output_dir.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another process is already training {output_dir} (lock {lock.lock_file})") from None
    return lock


def _run_locked(spec: dict, experiment: Experiment, output_dir: Path, work: Path, state, reporter: Reporter) -> dict:
    from transformers import AutoTokenizer, set_seed

    from trainer.training.evaluate import exact_match, load_held_out

    tc = experiment.training
    tags = {str(k): str(v) for k, v in (spec.get("tags") or {}).items()}
    if output_dir.exists():  # finished by another process while we waited to start
        return _read_summary(output_dir)

    # A previous run finished training and wrote its summary, then was stopped.
    if is_finished_partial(work):
        if state.is_main_process:
            reporter.info("%s holds a finished run; completing it", work)
            _end_mlflow_run_of(work, experiment, reporter)
            _finalize(work, output_dir)
        state.wait_for_everyone()
        return _read_summary(output_dir)

    if state.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        for p in work.glob("checkpoint-*"):
            if p.is_dir() and not _complete_checkpoint(p):
                reporter.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)
    state.wait_for_everyone()
    resume = last_checkpoint(work)

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SpecError(f"tokenizer in {spec['tokenizer_dir']} has neither a pad nor an eos token")
    # The template set-up is read where the data stage stored it, with the tokenizer.
    setup = load_template_setup(spec["tokenizer_dir"])
    eot = setup.eot_token
    stop_tokens = [eot] if eot else []

    train_ds = PackedDataset(spec["train_shards"])
    if len(train_ds) == 0:
        raise SpecError(f"no rows in the train shards {spec['train_shards']}")
    eval_ds = PackedDataset(spec["eval_shards"]) if spec.get("eval_shards") else None
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None

    held = load_held_out(spec["held_out"]) if spec.get("held_out") else []
    accuracy_rows = held[: max(tc.accuracy_rows, 0)]
    sample_rows = held[: max(tc.sample_generations, 0)]

    run = None
    if state.is_main_process:
        try:
            run = _open_mlflow(experiment, spec, work, reporter)
            reporter.mlflow = run
        except Exception as e:  # tracking must never stop training
            reporter.warning("MLflow unavailable (%s): not tracking this run", e)
            run = None

    set_seed(tc.seed)
    if spec.get("base_model"):
        base_path = str(spec["base_model"])
    else:
        with state.main_process_first():
            base_path = resolve_base_model(experiment.model, experiment.store_root,
                                           base_vocab_size(tokenizer, setup.added_tokens))
    model, base_rows, new_ids = build_model(experiment, tokenizer, base_path, setup.added_tokens,
                                            reporter, state.device)

    world = state.num_processes
    expected_spe = steps_per_epoch(len(train_ds), tc.per_device_train_batch_size,
                                   tc.gradient_accumulation_steps, world)
    reporter.info("training %s (%s) on %d packed rows: %d steps per epoch (batch %d x accumulation %d x %d "
                  "processes), base model %s", experiment.name, tc.mode, len(train_ds), expected_spe,
                  tc.per_device_train_batch_size, tc.gradient_accumulation_steps, world, base_path)

    # Accuracy of the base model (adapter disabled), once per run: a resumed run reuses it.
    before_file = work / BEFORE_FILE
    accuracy_before = None
    if accuracy_rows:
        if before_file.exists():
            accuracy_before = json.loads(before_file.read_text())["accuracy_before"]
        else:
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") and tc.mode != "full" else nullcontext()
            with ctx:
                gens = distributed_generate(model, tokenizer, [r["prompt"] for r in accuracy_rows],
                                            tc.max_new_tokens, stop_tokens)
            accuracy_before = exact_match(gens, [r["reference"] for r in accuracy_rows])
            if state.is_main_process:
                before_file.write_text(json.dumps({"accuracy_before": accuracy_before}))
        reporter.info("held-out exact match before training: %.4f (%d rows)", accuracy_before, len(accuracy_rows))
        if run is not None:
            run.log_metrics({"accuracy_before": accuracy_before}, step=0)

    counter = TokenCounter()
    if resume is not None:
        if not counter.load(resume / COUNTERS_FILE):
            reporter.warning("%s has no token counters; counting from zero", resume.name)
    callback_cls = _make_callback_class()
    sample_steps = tc.eval_steps or tc.logging_steps
    callback = callback_cls(reporter=reporter, run=run, counter=counter, tokenizer=tokenizer, samples=sample_rows,
                            stop_tokens=stop_tokens, max_new_tokens=tc.max_new_tokens,
                            sample_strategy=tc.eval_strategy, sample_steps=sample_steps,
                            has_eval=eval_ds is not None)
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=training_arguments(experiment, work, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PackedCollator(pad_id),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.token_counter = counter
    callback.trainer = trainer

    resumed_step = 0
    if resume is not None:
        resumed_step = int(json.loads((resume / "trainer_state.json").read_text()).get("global_step", 0))
        reporter.info("resuming from %s (global step %d)", resume.name, resumed_step)

    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    runtime = time.time() - started

    global_step = trainer.state.global_step
    epochs = tc.num_train_epochs
    if tc.max_steps <= 0 and float(epochs).is_integer() and global_step != expected_spe * int(epochs):
        reporter.warning("Trainer ran %d steps; %d epochs x %d steps per epoch were expected",
                         global_step, int(epochs), expected_spe)

    eval_loss = None
    if eval_ds is not None:
        last_eval = [e for e in trainer.state.log_history if "eval_loss" in e]
        if last_eval and last_eval[-1].get("step") == global_step:
            eval_loss = last_eval[-1]["eval_loss"]
        else:
            eval_loss = trainer.evaluate().get("eval_loss")

    accuracy_after = None
    final_model = trainer.model
    if accuracy_rows:
        gens = distributed_generate(final_model, tokenizer, [r["prompt"] for r in accuracy_rows],
                                    tc.max_new_tokens, stop_tokens)
        accuracy_after = exact_match(gens, [r["reference"] for r in accuracy_rows])
        reporter.info("held-out exact match after training: %.4f (before %.4f)", accuracy_after, accuracy_before)
        if run is not None:
            run.log_metrics({"accuracy_after": accuracy_after}, step=global_step)
            k = len(sample_rows)
            if k:
                run.log_table({"step": [global_step] * k, "prompt": [r["prompt"] for r in sample_rows],
                               "generation": gens[:k], "reference": [r["reference"] for r in sample_rows]},
                              artifact_file="samples/final.json")
    elif sample_rows:
        callback.log_samples(global_step, name="final")

    save_final_model(trainer, work, new_ids, state.is_main_process)
    summary = {
        "experiment": experiment.name,
        "mode": tc.mode,
        "output_dir": str(output_dir),
        "base_model": experiment.model.base,
        "base_model_path": base_path,
        "mlflow_run_id": run.run_id if run is not None else None,
        "mlflow_tracking_uri": run.tracking_uri if run is not None else None,
        "global_step": global_step,
        "steps_per_epoch": expected_spe,
        "train_rows": len(train_ds),
        "world_size": state.num_processes,
        "train_loss": _full_train_loss(trainer, resumed_step, float(output.training_loss)),
        "eval_loss": eval_loss,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "trainable_tokens": counter.trainable_tokens,
        "tokens": counter.tokens,
        "train_runtime": runtime,
        "resumed_from_step": resumed_step or None,
        "vocab_size": len(tokenizer),
        "base_vocab_rows": base_rows,
        "new_token_ids": new_ids,
        "eot_token": eot,
        "tags": tags,
    }
    if state.is_main_process:
        tokenizer.save_pretrained(str(work))
        (work / MODEL_CARD).write_text(model_card(experiment, spec, summary, base_path))
        if run is not None:
            try:
                run.log_metrics({k: summary[k] for k in ("train_loss", "trainable_tokens", "train_runtime")
                                 if summary.get(k) is not None}, step=global_step)
                artifacts = "adapter" if tc.mode != "full" else "model"
                for p in sorted(work.iterdir()):  # the result, not checkpoints or bookkeeping
                    if not CHECKPOINT_RE.match(p.name) and p.name not in (RUN_ID_FILE, BEFORE_FILE):
                        (run.log_artifacts if p.is_dir() else run.log_artifact)(
                            p, f"{artifacts}/{p.name}" if p.is_dir() else artifacts)
            except Exception as e:
                reporter.warning("MLflow artifact logging failed: %s", e)
        _write_summary(work, summary)
        if run is not None:
            try:
                run.log_artifact(work / TRAINING_SUMMARY)
                run.end("FINISHED")
            except Exception as e:
                reporter.warning("MLflow: %s", e)
        _finalize(work, output_dir)
        reporter.info("training complete: %s (step %d, train loss %.4f)", output_dir, global_step,
                      summary["train_loss"])
        reporter.materialization(
            {**{k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, "output_dir": str(output_dir)},
            tags.get("adapter_version"))
    state.wait_for_everyone()
    return summary


def is_finished_partial(work: Path) -> bool:
    return (work / TRAINING_SUMMARY).exists()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m trainer.training.train SPEC.json   (or: accelerate launch -m trainer.training.train SPEC.json)",
              file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )
    run_training(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
