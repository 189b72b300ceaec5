"""Packed rows → model batches in which documents never see each other.

A packed row holds several documents back to back (`seq_lengths` gives their lengths). Restarting
`position_ids` alone does NOT isolate them on sdpa/eager (transformers only builds a varlen
layout from position_ids for flash-attention); an explicit 4-D block-diagonal causal mask does,
and transformers 5.x passes a 4-D mask to the attention functions unchanged. The tests compare a
packed row with each document run alone.

Batch keys: `input_ids`, `labels`, `position_ids` ([B, T] int64), `attention_mask` ([B, 1, T, T]
bool, True = may attend; a padding token attends only to itself so no query row is empty) and
`row_index` / `row_length` ([B]: the dataset rows, for error messages, and their real lengths;
not model inputs — `model_inputs` drops them). Eager attention adds the mask to the scores, so a bool mask must become an additive
float mask first: `model_inputs(batch, model)` does that per attention implementation.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.core.schemas import IGNORE_INDEX


NON_MODEL_KEYS = ("row_index", "row_length")


class NoTrainableTokensError(ValueError):
    """A batch in which no token has a label: its loss would be NaN (or a meaningless 0)."""


class PackedDataset(torch.utils.data.Dataset):
    """Rows of the memory-mapped `shard-*.arrow` files of a packed stage directory.

    Items are dicts of int64 numpy arrays `input_ids`, `labels`, `seq_lengths` plus `row_index`
    (position in the concatenation of the shards, in file name order).
    """

    columns = ("input_ids", "labels", "seq_lengths")

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.paths = _shard_paths(self.directory)
        self._chunks: list[dict[str, tuple[np.ndarray, np.ndarray]]] | None = None
        self._starts: list[int] = []
        self._num_rows = 0
        self._open()

    def _open(self) -> None:
        import pyarrow as pa

        chunks, starts, total = [], [], 0
        for path in self.paths:
            source = pa.memory_map(str(path), "r")
            table = pa.ipc.open_file(source).read_all()
            missing = [c for c in self.columns if c not in table.column_names]
            if missing:
                raise ValueError(f"{path}: packed shard lacks column(s) {missing}")
            for batch in table.to_batches():
                if batch.num_rows == 0:
                    continue
                entry = {}
                for name in self.columns:
                    col = batch.column(batch.schema.get_field_index(name))
                    if col.null_count:
                        raise ValueError(f"{path}: column {name} has null rows")
                    offsets = col.offsets.to_numpy(zero_copy_only=False)
                    values = col.values.to_numpy(zero_copy_only=False)
                    entry[name] = (offsets, values)
                chunks.append(entry)
                starts.append(total)
                total += batch.num_rows
        self._chunks, self._starts, self._num_rows = chunks, starts, total

    def __getstate__(self):  # DataLoader workers re-open the memory maps
        state = dict(self.__dict__)
        state["_chunks"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self._num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self._num_rows
        if not 0 <= index < self._num_rows:
            raise IndexError(index)
        k = bisect.bisect_right(self._starts, index) - 1
        j = index - self._starts[k]
        item: dict[str, Any] = {}
        for name, (offsets, values) in self._chunks[k].items():
            item[name] = np.asarray(values[offsets[j]:offsets[j + 1]], dtype=np.int64)
        item["row_index"] = index
        return item


def _shard_paths(directory: Path) -> list[Path]:
    try:
        from trainer.core.arrow_io import shard_paths

        return list(shard_paths(directory))
    except ImportError:  # pragma: no cover - arrow_io ships with the package
        paths = sorted(directory.glob("shard-*.arrow"))
        if not paths:
            raise FileNotFoundError(f"no shard-*.arrow files in {directory}")
        return paths


class PackedCollator:
    """Pads packed rows to the longest row and builds restarting position_ids + a 4-D
    block-diagonal causal mask. Labels of each document's first token are set to −100 (no token
    may be predicted from the previous document). A batch with no trainable token raises
    `NoTrainableTokensError` naming its rows.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, check_trainable: bool = True):
        if pad_token_id is None:
            raise ValueError("PackedCollator: pad_token_id is required (use the tokenizer's pad or eos id)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.check_trainable = check_trainable

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PackedCollator: empty batch")
        lengths = [len(r["input_ids"]) for r in rows]
        T = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        # Document id per token; padding gets unique negative ids so it attends only to itself.
        doc_ids = -1 - torch.arange(T, dtype=torch.long).repeat(B, 1)
        row_index = torch.tensor([int(r.get("row_index", i)) for i, r in enumerate(rows)], dtype=torch.long)
        for b, row in enumerate(rows):
            n = lengths[b]
            ids = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)
            lab = torch.as_tensor(np.asarray(row["labels"]), dtype=torch.long)
            seq = [int(x) for x in row["seq_lengths"]]
            if len(lab) != n:
                raise ValueError(f"row {int(row_index[b])}: {len(lab)} labels for {n} input_ids")
            if sum(seq) != n or any(s <= 0 for s in seq):
                raise ValueError(f"row {int(row_index[b])}: seq_lengths {seq} do not sum to the row length {n}")
            seq_t = torch.tensor(seq, dtype=torch.long)
            starts = torch.cumsum(seq_t, 0) - seq_t
            lab = lab.clone()
            lab[starts] = IGNORE_INDEX
            input_ids[b, :n] = ids
            labels[b, :n] = lab
            doc_ids[b, :n] = torch.repeat_interleave(torch.arange(len(seq)), seq_t)
            position_ids[b, :n] = torch.arange(n) - torch.repeat_interleave(starts, seq_t)
        if self.check_trainable:
            trainable = (labels != IGNORE_INDEX).sum(1)
            if int(trainable.sum()) == 0:
                raise NoTrainableTokensError(
                    "batch has no trainable token (every label is -100), its loss would be NaN: "
                    f"dataset rows {row_index.tolist()}; the data stage must reject rows with nothing to train on")
        causal = torch.ones((T, T), dtype=torch.bool).tril_()
        mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": mask[:, None, :, :],
            "row_index": row_index,
            "row_length": torch.tensor(lengths, dtype=torch.long),
        }


def attention_implementation(model) -> str:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):
        config = model.module.config
    return getattr(config, "_attn_implementation", None) or "eager"


def model_inputs(batch: dict[str, Any], model=None, attn_implementation: str | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The batch as the model's forward expects it for its attention implementation.

    sdpa: the bool mask as is. eager: an additive float mask (0 / dtype min). flash-attention
    kernels: the batch flattened to one padding-free row with restarting position_ids and no mask
    (transformers runs varlen flash attention from position_ids only for a single row).
    """
    impl = attn_implementation or attention_implementation(model)
    out = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    mask = out.get("attention_mask")
    if mask is None or mask.dim() != 4:
        return out
    if "flash" in impl:
        return flatten_for_varlen(batch)
    if impl == "sdpa":
        return out
    if impl == "eager":
        if mask.dtype == torch.bool:
            if dtype is None:
                dtype = _model_dtype(model)
            out["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(dtype).min)
        return out
    raise NotImplementedError(
        f"attn_implementation {impl!r}: packed batches are isolated only on sdpa, eager and flash-attention "
        "(set model.init_kwargs.attn_implementation)")


def flatten_for_varlen(batch: dict[str, Any]) -> dict[str, Any]:
    """[B, T] batch → [1, sum(row lengths)] without padding, no mask. The row boundaries stay safe:
    every row starts with a document whose first label is −100."""
    input_ids = batch["input_ids"]
    lengths = batch.get("row_length")
    if lengths is None:
        keep = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        keep = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths.to(input_ids.device)[:, None]
    out = {k: batch[k][keep][None, :] for k in ("input_ids", "labels", "position_ids") if k in batch}
    return out


def _model_dtype(model) -> torch.dtype:
    if model is None:
        return torch.float32
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def steps_per_epoch(rows: int, per_device_batch: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch, exactly as `Trainer` counts them (drop_last off).

    Each rank gets ceil(batches / world_size) micro-batches (accelerate's even_batches pads the
    last round), and the last accumulation window may be short.
    """
    if rows <= 0:
        return 0
    batches = -(-rows // per_device_batch)
    per_rank = -(-batches // world_size)
    return max(-(-per_rank // grad_accum), 1)
