"""The packed shards outside sftdag: `packed_dataset` gives them to `datasets` memory-mapped, and
TRL's `SFTTrainer` trains on them as they are (our labels, our document boundaries)."""

from __future__ import annotations

import importlib
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.train_helpers import write_shards
from trainer.data.export import packed_dataset
from trainer.data.prepare import DataPipeline

COLUMNS = ["input_ids", "labels", "seq_lengths"]


def prepared(make_experiment) -> tuple[Path, Path]:
    """Real shards (several) from the default data and the builtin tokenizer: (shard dir, tokenizer dir)."""
    outputs = DataPipeline(make_experiment(data={"rows_per_shard": 4}), progress=False).run()
    return Path(outputs["packed/train"].path), Path(outputs["tokenizer"].path)


def read_ipc_files(directory: Path) -> pa.Table:
    """The shards read independently of the code under test (fully into memory)."""
    return pa.concat_tables([pa.ipc.open_file(pa.BufferReader(p.read_bytes())).read_all()
                             for p in sorted(directory.glob("shard-*.arrow"))])


def mapped_ranges(directory: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of the shard files."""
    shards = {str(p.resolve()) for p in directory.glob("shard-*.arrow")}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in shards:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


def assert_memory_mapped(ds, directory: Path) -> None:
    """Every Arrow buffer behind `ds` lies inside a memory map of a shard file: none is a copy."""
    ranges = mapped_ranges(directory)
    buffers = [b for column in ds.data.table.columns for chunk in column.chunks for b in chunk.buffers()
               if b is not None and b.size]
    assert ranges and buffers
    outside = [b for b in buffers if not any(low <= b.address and b.address + b.size <= high for low, high in ranges)]
    assert not outside, f"{len(outside)} of {len(buffers)} buffers are not the shard files' memory maps"


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


@needs_proc
def test_packed_dataset_is_the_shards_memory_mapped(make_experiment):
    directory, _ = prepared(make_experiment)
    assert len(list(directory.glob("shard-*.arrow"))) >= 2
    allocated = pa.total_allocated_bytes()
    ds = packed_dataset(directory)
    assert pa.total_allocated_bytes() == allocated  # Arrow allocated nothing: no buffer was read or copied
    assert_memory_mapped(ds, directory)

    expected = read_ipc_files(directory)
    assert ds.column_names == COLUMNS and ds.num_rows == expected.num_rows > 0
    assert all(str(ds.features[c].feature.dtype) == "int32" for c in COLUMNS)
    assert ds.data.table.equals(expected)  # every row, in shard order
    assert ds[0] == expected.slice(0, 1).to_pylist()[0]
    for row in ds:  # what TRL reads: seq_lengths cover the row, labels align with input_ids
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["labels"])
    assert ds.cache_files == []  # datasets will never write its caches into the store
    # Same shards, same fingerprint (datasets' cache key); a fresh one would mean hashing the content.
    assert packed_dataset(directory)._fingerprint == ds._fingerprint


@needs_proc
def test_opening_large_shards_reads_nothing(tmp_path):
    """16 MB of shards: opening them allocates nothing, in Arrow or in Python (datasets would hash
    the whole table for a fingerprint unless given one)."""
    rows, length = 4000, 512
    ids = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * length + 1, length, dtype=np.int32)),
                                   pa.array(np.random.default_rng(0).integers(0, 1000, rows * length, dtype=np.int32)))
    docs = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * rows + 1, 2, dtype=np.int32)),
                                    pa.array(np.full(2 * rows, length // 2, dtype=np.int32)))
    write_shards(tmp_path, pa.table({"input_ids": ids, "labels": ids, "seq_lengths": docs}), 1500)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard-*.arrow"))
    del ids, docs
    importlib.import_module("datasets")  # its import is not what is measured

    allocated = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        ds = packed_dataset(tmp_path)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pa.total_allocated_bytes() == allocated
    assert python_peak < on_disk / 100, (python_peak, on_disk)
    assert ds.num_rows == rows and len(ds[rows - 1]["input_ids"]) == length
    assert_memory_mapped(ds, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_trl_sft_trainer_trains_on_the_shards_as_they_are(make_experiment, tmp_path, attn):
    pytest.importorskip("trl")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    directory, tokenizer_dir = prepared(make_experiment)
    ds = packed_dataset(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation=attn))
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        padding_free=True,  # the collator flattens the batch and reads seq_lengths for position_ids
        max_length=None,  # rows are already within max_length (TRL refuses padding_free + max_length unpacked)
        dataset_kwargs={"skip_prepare_dataset": True},  # no tokenizing, truncating, packing or label building
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    assert trainer.train_dataset is ds

    # The batch TRL builds from two rows is those rows back to back: our input_ids and labels
    # unchanged (TRL masks each document's first label; ours already are −100), and position_ids
    # restarting at 0 at every seq_lengths boundary. No attention_mask: transformers derives the
    # block-diagonal causal mask from the restarting position_ids.
    rows = [ds[0], ds[1]]
    batch = trainer.data_collator(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert batch["input_ids"][0].tolist() == rows[0]["input_ids"] + rows[1]["input_ids"]
    assert batch["labels"][0].tolist() == rows[0]["labels"] + rows[1]["labels"]
    documents = [n for row in rows for n in row["seq_lengths"]]
    assert len(documents) > 2
    assert batch["position_ids"][0].tolist() == [p for n in documents for p in range(n)]

    # TRL's per-token log-probabilities on that batch (what its loss averages) are those of each
    # document run alone, scored on our labels: the documents do not see each other (with this
    # attention implementation, on CPU) and the labels are shifted once, as ours mean.
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        # The forward compute_loss makes (TRL's fused LM head returns the per-token log-probabilities).
        trl_log_probs = trainer.model(**batch, use_cache=False, fused_lm_head=True).log_probs[0]
        ids, labels = batch["input_ids"][0], batch["labels"][0].long()
        expected, start = [], 0
        for n in documents:
            log_probs = model(input_ids=ids[None, start:start + n]).logits[0, :-1].float().log_softmax(-1)
            target = labels[start + 1:start + n]
            scored = log_probs.gather(1, target.clamp(min=0)[:, None])[:, 0]
            expected += [scored.where(target != -100, 0.0), torch.zeros(1)]  # + the cross-document position
            start += n
        expected = torch.cat(expected)[:-1]
    trainable = labels[1:] != -100
    assert int(trainable.sum()) > 0
    torch.testing.assert_close(trl_log_probs, expected, atol=1e-5, rtol=1e-5)
    assert loss.item() == pytest.approx(-expected.sum().item() / int(trainable.sum()), rel=1e-5)

    model.train()
    result = trainer.train()
    assert result.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses + [result.training_loss])
