"""One optimizer update per call on a batch you hand it: the training half of an iterative
generate → filter → train loop (expert iteration, rejection-sampling fine-tuning).

`IterativeSFTTrainer(model, tokenizer, ...)` takes a transformers causal LM or a PEFT model and a
fast tokenizer. Each `step()` takes one batch in one of three forms:

- `input_ids` (+ optional `attention_mask`, `labels`): lists of 1-D tensors or int lists, one
  per sequence, used as given. Labels, when given, are kept exactly (a masked prompt stays
  masked, a trained EOS stays trained even if it equals the pad id); without labels every
  attended token is trained.
- `texts` (+ optional `texts_labels`): `texts[i]` is the whole sequence. Without
  `texts_labels` all of it is trained. With them, `texts_labels[i]` must be a suffix of
  `texts[i]`: only that suffix is trained, and the text before it is tokenized on its own, so
  its tokens are exactly what generation sees for that prompt (a row whose label is not a
  suffix is refused, naming the row).
- `prompts` + `completions`: the same as `texts=[p + c]`, `texts_labels=[c]`.

Texts are tokenized as written (`trainer.data.tokenization`: no special tokens are added, so a
chat template's rendering keeps its own); `append_eos=True` appends the tokenizer's EOS to every
text sequence, trained. `max_length` cuts each sequence alone (`keep_end` keeps its last tokens,
`keep_start` its first) before sequences are padded together; padding is masked by length,
never by comparing ids with the pad id. The loss is the cross-entropy summed over every label
token of the step divided by their number, however the step is split into micro-batches
(`micro_batch_size`), so a step is one full-batch step and one optimizer update. The learning
rate schedule is transformers' `get_scheduler` (constant by default); a decaying one needs
`total_steps`. `save(dir)` / `load(dir)` write and restore the weights (the adapter for a PEFT
model), optimizer, scheduler, RNG states and step counter; a save is written to
`dir.partial` and renamed, so a directory named `dir` is always complete.

Example (from the repository root; offline, seconds on a CPU)::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    >>> from trainer.loop.iterative import IterativeSFTTrainer
    >>> tok = AutoTokenizer.from_pretrained("trainer/resources/tiny_tokenizer")
    >>> config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    >>> trainer = IterativeSFTTrainer(get_peft_model(LlamaForCausalLM(config), lora), tok,
    ...                               learning_rate=1e-3, lr_scheduler_type="linear", total_steps=4)
    >>> for round_ in range(2):  # each round: generate, keep the good samples, train on them
    ...     metrics = trainer.step(prompts=["What is 2+2? ", "What is 3+3? "], completions=["4", "6"],
    ...                            append_eos=True)
    >>> metrics.step, metrics.label_tokens  # the completions and their EOS
    (2, 4)
    >>> saved = trainer.save(Path(tempfile.mkdtemp()) / "round-2")
    >>> trainer.load(saved)  # or into a trainer built the same way, in a new process
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from accelerate.utils.memory import clear_device_cache
from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_model, save_model
from transformers import get_scheduler

from trainer.core.schemas import IGNORE_INDEX
from trainer.data.tokenization import tokenize_rows

TRUNCATION_MODES = ("keep_end", "keep_start")
# Schedules whose learning rate does not depend on a run length.
LENGTHLESS_SCHEDULES = ("constant", "constant_with_warmup")
# Schedules stepped with a metric, which step() has none of.
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")

MODEL_DIR = "model"
FULL_WEIGHTS = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "trainer.json"

Ids = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class TrainingSequence:
    """One sequence as trained: 1-D `input_ids`, `attention_mask`, `labels` (after truncation)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def label_tokens(self) -> int:
        """Tokens with a loss: a causal LM predicts position t from the tokens before it, so a
        label at position 0 has nothing to be predicted from."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class StepMetrics:
    step: int  # optimizer updates done, this one included
    loss: float  # mean cross-entropy over the step's label tokens
    label_tokens: int
    sequences: int
    learning_rate: float  # the rate this update used
    grad_norm: float  # before clipping


class IterativeSFTTrainer:
    """SFT steps on batches chosen between steps (see the module docstring).

    AdamW over the model's trainable parameters (a PEFT model's adapter); `lr_scheduler_type`
    is any transformers schedule stepped without a metric, and all but `constant` and
    `constant_with_warmup` need `total_steps` (a step past it is refused). `max_grad_norm=None`
    does not clip. `micro_batch_size` bounds the sequences per forward pass, not the update.
    `free_device_cache` collects garbage and empties the accelerator's cache after each step
    (memory for generation between steps, at some speed).
    """

    def __init__(self, model, tokenizer, *, learning_rate: float = 5e-5, weight_decay: float = 0.0,
                 lr_scheduler_type: str = "constant", total_steps: int | None = None, warmup_steps: int = 0,
                 max_grad_norm: float | None = 1.0, max_length: int | None = None,
                 truncation_mode: str = "keep_end", micro_batch_size: int | None = None,
                 free_device_cache: bool = False):
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode: {truncation_mode!r} is not one of {TRUNCATION_MODES}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length: {max_length} leaves no token to predict (needs at least 2)")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: {micro_batch_size} (needs at least 1)")
        if total_steps is not None and total_steps < 1:
            # TRL passed max_steps=-1 to the schedule, which gave learning rate 0 from step 0.
            raise ValueError(f"total_steps: {total_steps} (needs at least 1, or None for a constant schedule)")
        if lr_scheduler_type in METRIC_SCHEDULES:
            raise ValueError(f"lr_scheduler_type: {lr_scheduler_type!r} is stepped with a metric; step() has none")
        if lr_scheduler_type not in LENGTHLESS_SCHEDULES and total_steps is None:
            raise ValueError(f"lr_scheduler_type: {lr_scheduler_type!r} decays over the run and needs total_steps")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = {
            "learning_rate": learning_rate, "weight_decay": weight_decay, "lr_scheduler_type": lr_scheduler_type,
            "total_steps": total_steps, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
            "max_length": max_length, "truncation_mode": truncation_mode, "micro_batch_size": micro_batch_size,
        }
        self.free_device_cache = free_device_cache
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("model: no parameter requires grad (nothing to train)")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=learning_rate, weight_decay=weight_decay)
        self.scheduler = get_scheduler(lr_scheduler_type, self.optimizer, num_warmup_steps=warmup_steps,
                                       num_training_steps=total_steps)
        self.global_step = 0

    # ---- batches -------------------------------------------------------------------------------

    def prepare_sequences(self, *, input_ids: Sequence[Ids] | None = None,
                          attention_mask: Sequence[Ids] | None = None, labels: Sequence[Ids] | None = None,
                          texts: Sequence[str] | None = None, texts_labels: Sequence[str] | None = None,
                          prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None,
                          append_eos: bool = False) -> list[TrainingSequence]:
        """The sequences `step()` trains on, given the same arguments (see the module docstring)."""
        forms = [name for name, value in (("input_ids", input_ids), ("texts", texts), ("prompts", prompts))
                 if value is not None]
        if len(forms) != 1:
            raise ValueError(f"step: give exactly one of input_ids, texts, prompts (got {forms or 'none'})")
        if input_ids is not None:
            if append_eos or texts_labels is not None or completions is not None:
                raise ValueError("step: append_eos, texts_labels and completions apply to text inputs only")
            rows = self._rows_from_ids(input_ids, attention_mask, labels)
        else:
            if attention_mask is not None or labels is not None:
                raise ValueError("step: attention_mask and labels apply to input_ids only")
            rows = self._rows_from_texts(texts, texts_labels, prompts, completions, append_eos)
        if not rows:
            raise ValueError("step: empty batch")
        sequences = [self._truncate(row) for row in rows]
        for i, (row, seq) in enumerate(zip(rows, sequences)):
            if seq.label_tokens == 0:
                cut = (f" after truncation to max_length={self.settings['max_length']}"
                       f" ({self.settings['truncation_mode']})" if seq is not row else "")
                raise ValueError(f"row {i}: no token to train{cut}")
        return sequences

    def _rows_from_ids(self, input_ids, attention_mask, labels) -> list[TrainingSequence]:
        n = len(input_ids)
        for name, column in (("attention_mask", attention_mask), ("labels", labels)):
            if column is not None and len(column) != n:
                raise ValueError(f"{name}: {len(column)} rows for {n} rows of input_ids")
        vocab = self.model.get_input_embeddings().num_embeddings
        rows = []
        for i in range(n):
            ids = torch.as_tensor(input_ids[i], dtype=torch.long)
            if ids.ndim != 1 or ids.numel() == 0:
                raise ValueError(f"row {i}: input_ids must be a non-empty 1-D sequence (got shape {tuple(ids.shape)})")
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise ValueError(f"row {i}: input_ids outside the model's vocabulary (0..{vocab - 1})")
            mask = (torch.ones_like(ids) if attention_mask is None
                    else torch.as_tensor(attention_mask[i], dtype=torch.long))
            if mask.shape != ids.shape:
                raise ValueError(f"row {i}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
            lab = (ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None
                   else torch.as_tensor(labels[i], dtype=torch.long))
            if lab.shape != ids.shape:
                raise ValueError(f"row {i}: labels has shape {tuple(lab.shape)}, input_ids {tuple(ids.shape)}")
            trained = lab[lab != IGNORE_INDEX]
            if trained.numel() and (int(trained.min()) < 0 or int(trained.max()) >= vocab):
                raise ValueError(f"row {i}: labels outside the model's vocabulary (0..{vocab - 1}) "
                                 f"and not {IGNORE_INDEX}")
            rows.append(TrainingSequence(ids, mask, lab))
        return rows

    def _rows_from_texts(self, texts, texts_labels, prompts, completions, append_eos) -> list[TrainingSequence]:
        for name, column in (("texts", texts), ("texts_labels", texts_labels), ("prompts", prompts),
                             ("completions", completions)):
            if isinstance(column, str):
                raise TypeError(f"{name}: a list of strings, not one string")
        if prompts is not None:
            if completions is None or len(completions) != len(prompts):
                raise ValueError(f"completions: {'missing' if completions is None else len(completions)} "
                                 f"for {len(prompts)} prompts")
            if texts_labels is not None:
                raise ValueError("texts_labels: give them with texts, not with prompts")
            texts = [p + c for p, c in zip(prompts, completions)]
            texts_labels = completions
        elif completions is not None:
            raise ValueError("completions: given without prompts")
        elif texts_labels is not None and len(texts_labels) != len(texts):
            raise ValueError(f"texts_labels: {len(texts_labels)} rows for {len(texts)} texts")
        starts = []
        for i, text in enumerate(texts):
            if texts_labels is None:
                starts.append(0)
            elif text.endswith(texts_labels[i]):
                starts.append(len(text) - len(texts_labels[i]))
            else:
                raise ValueError(f"row {i}: texts_labels[{i}] is not a suffix of texts[{i}]")
        eos = ""
        if append_eos:
            if self.tokenizer.eos_token is None:
                raise ValueError("append_eos: the tokenizer has no eos_token")
            eos = str(self.tokenizer.eos_token)
        table = pa.table({
            "row_id": pa.array(range(len(texts)), pa.int64()),
            "text": pa.array([t + eos for t in texts], pa.string()),
            "span_starts": pa.array([[s] for s in starts], pa.list_(pa.int32())),
            "span_ends": pa.array([[len(t) + len(eos)] for t in texts], pa.list_(pa.int32())),
        })
        tokenized, rejects = tokenize_rows(table, self.tokenizer, progress=False)
        if rejects:
            row, reason = rejects[0]
            raise ValueError(f"row {row}: {reason}")
        rows = []
        for ids, lab in zip(tokenized.column("input_ids").to_pylist(), tokenized.column("labels").to_pylist()):
            if append_eos and ids[-1] != self.tokenizer.eos_token_id:
                raise ValueError(f"append_eos: the tokenizer does not encode {eos!r} as eos_token_id")
            ids_t = torch.tensor(ids, dtype=torch.long)
            rows.append(TrainingSequence(ids_t, torch.ones_like(ids_t), torch.tensor(lab, dtype=torch.long)))
        return rows

    def _truncate(self, row: TrainingSequence) -> TrainingSequence:
        """The row cut alone to max_length (TRL sliced the padded [B, T] batch by rows instead)."""
        limit = self.settings["max_length"]
        if limit is None or row.input_ids.numel() <= limit:
            return row
        cut = slice(None, limit) if self.settings["truncation_mode"] == "keep_start" else slice(-limit, None)
        return TrainingSequence(row.input_ids[cut], row.attention_mask[cut], row.labels[cut])

    @staticmethod
    def _pad(rows: list[TrainingSequence], device) -> dict[str, torch.Tensor]:
        """Right-padded batch: padded positions get attention 0 and no label, whatever their id."""
        pad = torch.nn.utils.rnn.pad_sequence

        def stack(name: str, value: int) -> torch.Tensor:
            return pad([getattr(r, name) for r in rows], batch_first=True, padding_value=value).to(device)

        # The padding id is never attended to nor trained, so any id does.
        return {"input_ids": stack("input_ids", 0), "attention_mask": stack("attention_mask", 0),
                "labels": stack("labels", IGNORE_INDEX)}

    # ---- training ------------------------------------------------------------------------------

    def step(self, *, input_ids: Sequence[Ids] | None = None, attention_mask: Sequence[Ids] | None = None,
             labels: Sequence[Ids] | None = None, texts: Sequence[str] | None = None,
             texts_labels: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
             completions: Sequence[str] | None = None, append_eos: bool = False) -> StepMetrics:
        """One optimizer update on this batch. The model is left in the train/eval mode it had."""
        total = self.settings["total_steps"]
        if total is not None and self.global_step >= total:
            raise ValueError(f"step {self.global_step + 1}: the schedule ends at total_steps={total}")
        sequences = self.prepare_sequences(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                           texts=texts, texts_labels=texts_labels, prompts=prompts,
                                           completions=completions, append_eos=append_eos)
        label_tokens = sum(s.label_tokens for s in sequences)
        size = self.settings["micro_batch_size"] or len(sequences)
        max_norm = self.settings["max_grad_norm"]
        was_training = self.model.training
        self.model.train()
        try:
            loss = torch.zeros((), device=self.model.device)
            for start in range(0, len(sequences), size):
                batch = self._pad(sequences[start:start + size], self.model.device)
                # num_items_in_batch: the model sums the token losses and divides by the step's
                # label tokens, so micro-batch losses add up to the full batch's mean.
                out = self.model(**batch, num_items_in_batch=label_tokens)
                out.loss.backward()
                loss += out.loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable,
                                                       float("inf") if max_norm is None else max_norm)
            learning_rate = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)
        self.global_step += 1
        if self.free_device_cache:
            clear_device_cache(garbage_collection=True)
        return StepMetrics(step=self.global_step, loss=float(loss), label_tokens=label_tokens,
                           sequences=len(sequences), learning_rate=float(learning_rate), grad_norm=float(grad_norm))

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write weights (a PEFT model's adapter, via save_pretrained), optimizer, scheduler, RNG
        states and step counter to `directory`, replacing a previous save there. A crash
        leaves `directory` as it was, or (between the two renames) only the previous save as
        `directory.old`: never a directory named `directory` that is incomplete."""
        directory = Path(directory)
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        (partial / MODEL_DIR).mkdir(parents=True)
        if isinstance(self.model, PeftModel):
            self.model.save_pretrained(partial / MODEL_DIR)
        else:
            save_model(self.model, str(partial / MODEL_DIR / FULL_WEIGHTS))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": _rng_state()}, partial / STATE_FILE)
        (partial / META_FILE).write_text(json.dumps({"global_step": self.global_step, "settings": self.settings},
                                                    indent=1))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
        os.rename(partial, directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory

    def load(self, directory: str | Path) -> None:
        """Restore a `save()` into this trainer, built like the one that saved (same model
        architecture and adapter, same settings)."""
        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise FileNotFoundError(f"{directory}: not a saved trainer (no {META_FILE})")
        meta = json.loads((directory / META_FILE).read_text())
        differ = {k: (v, self.settings[k]) for k, v in meta["settings"].items() if self.settings.get(k) != v}
        if differ:
            raise ValueError(f"{directory}: saved with other settings (saved, this trainer): {differ}")
        device = self.model.device
        if isinstance(self.model, PeftModel):
            result = set_peft_model_state_dict(self.model, load_peft_weights(str(directory / MODEL_DIR),
                                                                             device=str(device)))
            if result.unexpected_keys:
                raise ValueError(f"{directory}: adapter weights this model lacks: {result.unexpected_keys[:3]}")
        else:
            load_model(self.model, str(directory / MODEL_DIR / FULL_WEIGHTS), device=str(device))
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.global_step = meta["global_step"]


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
