"""What the training loop adds to transformers' Trainer: packed batches, token counts, a chunked
loss, reporting.

`PackedTrainer` converts the block-diagonal mask of packed batches for the model's attention
implementation, counts tokens, computes the loss from the final hidden states a chunk of positions
at a time (`training.loss_chunk_tokens`; `chunked_causal_lm_loss`), and refuses non-finite losses
(naming the rows). The callback sends per-step metrics to MLflow/Pipes, logs sample generations at
each evaluation, and saves the token counters into every checkpoint.
"""

from __future__ import annotations

import ctypes
import functools
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


class _ChunkedNLL(torch.autograd.Function):
    """Summed negative log-likelihood of `targets` [N] under the logits `hidden` [N, H] @ W.T, `chunk`
    positions at a time, where W is `weight` [V, H] with the rows `row_ids` replaced by `rows` (peft's
    trained new-token rows; None: W is `weight`). The forward also computes each chunk's gradients
    (softmax minus one-hot, times W or the hidden states), as Liger's fused linear cross-entropy does:
    no [positions, vocabulary] tensor outlives its chunk, and the backward only scales what was kept.
    A frozen `weight` gets no gradient, the trained rows only theirs. Matmuls run in the autocast
    dtype when autocast is on (as the model's lm_head would), the softmax in fp32 (as transformers'
    loss does)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, row_ids=None, rows=None):
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_rows = rows is not None and ctx.needs_input_grad[5]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = {
            "hidden": torch.empty_like(hidden) if need_hidden else None,
            "weight": torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None,
            "rows": torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if need_rows else None,
        }
        with torch.autocast(device, enabled=False):
            h_all, w = hidden.to(compute), weight.to(compute)
            if rows is not None:
                w = w.index_copy(0, row_ids, rows.to(compute))
            for start in range(0, hidden.shape[0], chunk):
                h, t = h_all[start:start + chunk], targets[start:start + chunk]
                logits = (h @ w.T).float()
                log_norm = logits.logsumexp(-1)
                total += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_hidden or need_weight or need_rows:
                    d_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
                    d_logits[torch.arange(len(t), device=t.device), t] -= 1
                    d_logits = d_logits.to(compute)
                    if need_hidden:
                        grads["hidden"][start:start + chunk] = d_logits @ w
                    if need_weight:
                        grads["weight"] += d_logits.T @ h
                    if need_rows:
                        grads["rows"] += d_logits[:, row_ids].T @ h
        if need_weight and rows is not None:
            grads["weight"][row_ids] = 0  # replaced by the rows: those entries of `weight` are not used
        ctx.dtypes = (hidden.dtype, weight.dtype, rows.dtype if rows is not None else None)
        ctx.save_for_backward(grads["hidden"], grads["weight"], grads["rows"])
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scaled = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return scaled[0], scaled[1], None, None, None, scaled[2]


def chunked_causal_lm_loss(hidden: torch.Tensor, head: torch.Tensor | torch.nn.Module, labels: torch.Tensor,
                           chunk: int, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The loss a causal LM's own forward computes from `labels` (transformers' `ForCausalLMLoss`):
    position i predicts labels[i + 1], -100 labels (a packed document's first token among them, so
    no loss crosses documents) count nowhere; the mean over the counted labels, or their sum over
    `num_items_in_batch` when given. `hidden` [B, T, H] are the final hidden states (after the last
    norm), `head` the output projection (the model's `get_output_embeddings()`, or its weight
    [V, H]); only counted positions reach it."""
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    weight, row_ids, rows = _projection(head)
    total = _ChunkedNLL.apply(hidden[:, :-1][counted], weight, targets[counted], max(int(chunk), 1), row_ids, rows)
    if num_items_in_batch is None:
        return total / counted.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _projection(head) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight, row ids, rows) of an output projection: peft's trainable-token wrapper (one active,
    unmerged adapter) as its frozen base weight and its trained rows, so the gradient is computed
    for those rows alone, not for the whole [V, H] weight its `.weight` merges them into; anything
    else by its `.weight`."""
    if isinstance(head, torch.Tensor):
        return head, None, None
    adapter = getattr(head, "token_adapter", None)
    active = getattr(adapter, "active_adapters", None)
    if adapter is None or not active or len(active) != 1 or adapter.merged or adapter.disable_adapters:
        return head.weight, None, None
    rows = adapter.trainable_tokens_delta[active[0]]
    row_ids = torch.as_tensor(adapter.token_indices[active[0]], dtype=torch.long, device=rows.device)
    return adapter.base_layer.weight, row_ids, rows


def chunked_loss_unsupported(model) -> str | None:
    """Why `chunked_causal_lm_loss` would not be the model's own loss (None: it is): the output
    projection must be a plain bias-free Linear (or peft's trainable-token / modules-to-save wrapper
    of one, whose `.weight` is the trained weight), the logits unscaled, and the forward able to skip
    the logits (`logits_to_keep`)."""
    import inspect

    from peft.utils.other import AuxiliaryTrainingWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    linear = head.original_module if isinstance(head, AuxiliaryTrainingWrapper) else head
    if type(linear) is not torch.nn.Linear or linear.bias is not None:
        return f"the output projection is a {type(head).__name__}, not a bias-free Linear"
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for scaling in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier"):
        if getattr(config, scaling, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({scaling})"
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    return None


@functools.cache
def _libc_malloc_trim():
    try:  # the process's own symbols, libc's among them (no library search, no subprocess)
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def return_freed_memory() -> None:
    """Hand the pages of freed blocks back to the system. glibc keeps the activations' freed
    buffers in its heap, fragmented around the few tensors a step keeps, so the process's resident
    memory ratchets up (a checkpoint save, an evaluation's larger batches); trimming at those rare
    points keeps what is resident close to what is live. Per step it would cost time: the next
    step faults the pages back in."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class PackedTrainer(Trainer):
    def __init__(self, *args: Any, token_counter: TokenCounter, loss_chunk_tokens: int = 0, **kwargs: Any):
        """`loss_chunk_tokens` > 0: the loss by `chunked_causal_lm_loss` (the caller checks
        `chunked_loss_unsupported` first); 0: the model's own."""
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter
        self.loss_chunk_tokens = loss_chunk_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.get("row_index")
        labels = inputs.get("labels")
        if labels is not None and model.training:
            self.token_counter.add(labels, inputs.get("row_length"))
        prepared = model_inputs(inputs, self.model)
        # Trainer's own compute_loss still decides num_items_in_batch and scales the result; only the
        # forward that returns the loss differs
        forward = functools.partial(self._chunked_loss_forward, model) if self.loss_chunk_tokens and \
            labels is not None else model
        result = super().compute_loss(forward, prepared, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if labels is not None and not torch.isfinite(loss.detach()).all():
            trainable = int((labels != IGNORE_INDEX).sum())
            raise FloatingPointError(
                f"non-finite loss {loss.detach().float().item()} on dataset rows "
                f"{rows.tolist() if rows is not None else '?'} ({trainable} trainable tokens in the batch)")
        return result

    def evaluate(self, *args, **kwargs):
        return_freed_memory()  # the evaluation's batches start from what training actually holds
        return super().evaluate(*args, **kwargs)

    def _chunked_loss_forward(self, model, labels, num_items_in_batch=None, **inputs):
        # The forward (through DDP, peft and accelerate's autocast) stops before the logits; the
        # loss runs under the same autocast the model's own loss would have.
        skip_logits = torch.empty(0, dtype=torch.long, device=labels.device)
        unwrapped = self.accelerator.unwrap_model(model)
        with final_hidden_states(unwrapped) as final:
            outputs = model(**inputs, logits_to_keep=skip_logits, output_hidden_states=final.needs_all)
        hidden = outputs.hidden_states[-1] if final.needs_all else final.value
        if hidden is None:
            raise RuntimeError(f"{type(unwrapped).__name__}: its decoder's forward did not run; set "
                               "training.loss_chunk_tokens: 0 for the model's own loss")
        with self.accelerator.autocast():
            loss = chunked_causal_lm_loss(hidden, unwrapped.get_output_embeddings(), labels, self.loss_chunk_tokens,
                                          num_items_in_batch)
        return {"loss": loss}


class final_hidden_states:
    """The decoder's output (the final, normed hidden states) of the next forward, taken by a hook
    on the decoder: asking the model for `output_hidden_states` would keep every layer's hidden
    states alive until the loss (a batch's worth per layer, needlessly, in an evaluation without
    gradients). `needs_all`: the model has no separate decoder, so they must be asked for."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            decoder = base.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):  # a model without one (or no rule to find it)
            decoder = None
        self.decoder = decoder if isinstance(decoder, torch.nn.Module) and decoder is not base else None
        self.needs_all = self.decoder is None
        self.value = None

    def _keep(self, module, args, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def __enter__(self) -> "final_hidden_states":
        self.handle = self.decoder.register_forward_hook(self._keep) if self.decoder is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


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
        return_freed_memory()

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
