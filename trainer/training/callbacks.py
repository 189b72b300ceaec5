"""What the training loop adds to transformers' Trainer: packed batches, token counts, reporting.

`PackedTrainer` converts the block-diagonal mask of packed batches for the model's attention
implementation, counts tokens, and refuses non-finite losses (naming the rows). The callback sends
per-step metrics to MLflow/Pipes, logs sample generations at each evaluation, and saves the token
counters into every checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from trainer.core.schemas import IGNORE_INDEX
from trainer.training.collate import model_inputs
from trainer.training.output import COUNTERS_FILE
from trainer.training.reporting import Reporter

FINAL_METRICS = ("train_loss", "train_runtime")  # logged once, from the summary


class TokenCounter:
    """Real (non-padding) tokens and trainable tokens, summed over ranks once per optimizer step."""

    def __init__(self, device: torch.device):
        self.device = device
        self._local = [0, 0]
        self.tokens = 0
        self.trainable_tokens = 0

    def add(self, labels: torch.Tensor, row_length: torch.Tensor | None) -> None:
        # Sums stay on the device until `reduce` (one host sync per optimizer step, not per batch).
        real = row_length.sum() if row_length is not None else labels.numel()
        self._local[0] = self._local[0] + real
        self._local[1] = self._local[1] + (labels != IGNORE_INDEX).sum()

    def reduce(self) -> None:
        local = torch.stack([torch.as_tensor(v).double().cpu() for v in self._local])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            on_device = local.to(self.device)
            torch.distributed.all_reduce(on_device)
            local = on_device.cpu()
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


class PackedTrainer(Trainer):
    def __init__(self, *args: Any, token_counter: TokenCounter, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.get("row_index")
        labels = inputs.get("labels")
        if labels is not None and model.training:
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


class ReportingCallback(TrainerCallback):
    """Trainer passes the model to every event (`model=`), so nothing is attached after
    construction."""

    def __init__(self, *, reporter: Reporter, mlflow_run, counter: TokenCounter, tokenizer, samples: list[dict],
                 stop_tokens: list, max_new_tokens: int, sample_strategy: str, sample_steps: int | None,
                 has_eval: bool):
        self.reporter = reporter
        self.mlflow_run = mlflow_run
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

    # -- counters ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.time()
        self._last_tokens = self.counter.tokens

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.counter.reduce()
        if (not self.has_eval and self.sample_strategy == "steps" and self.sample_steps
                and state.global_step % self.sample_steps == 0):
            self.log_samples(model, state.global_step)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.has_eval and self.sample_strategy == "epoch":
            self.log_samples(model, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COUNTERS_FILE).write_text(json.dumps(self.counter.state()))
                self.reporter.info("checkpoint saved: %s", folder.name)

    # -- metrics -------------------------------------------------------------------------------
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
        if self.mlflow_run is not None:
            self.mlflow_run.log_metrics(metrics, step=state.global_step)

    # -- samples -------------------------------------------------------------------------------
    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.log_samples(model, state.global_step)

    def log_samples(self, model, step: int, name: str | None = None) -> None:
        if not self.samples or model is None:
            return
        prompts = [s["prompt"] for s in self.samples]
        gens = distributed_generate(model, self.tokenizer, prompts, self.max_new_tokens, self.stop_tokens)
        self.log_sample_table(step, gens, name)

    def log_sample_table(self, step: int, generations: list[str], name: str | None = None) -> None:
        if not (self.reporter.is_main and self.mlflow_run is not None):
            return
        k = len(self.samples)
        self.mlflow_run.log_table(
            {"step": [step] * k, "prompt": [s["prompt"] for s in self.samples], "generation": generations[:k],
             "reference": [s["reference"] for s in self.samples]},
            artifact_file=f"samples/{name or f'step_{step:06d}'}.json")


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)
