"""Packed batches: documents must not see each other, positions restart, labels are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.train_helpers import make_shards, pack_rows, random_documents, write_shards

from trainer.core.schemas import IGNORE_INDEX
from trainer.training.collate import (
    NoTrainableTokensError,
    PackedCollator,
    PackedDataset,
    model_inputs,
    steps_per_epoch,
)

VOCAB = 64


def tiny_llama(impl: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def three_documents(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in (5, 9, 6):
        ids = torch.randint(4, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        labels[1] = IGNORE_INDEX  # a masked prompt token too
        docs.append((ids, labels))
    return docs


def packed_row(docs):
    return {"input_ids": torch.cat([d[0] for d in docs]).numpy(), "labels": torch.cat([d[1] for d in docs]).numpy(),
            "seq_lengths": [len(d[0]) for d in docs], "row_index": 0}


def sum_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(shift_logits[keep].float(), shift_labels[keep], reduction="sum")
    return loss, int(keep.sum())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_equals_documents_run_alone(impl):
    model = tiny_llama(impl)
    docs = three_documents()
    batch = PackedCollator(pad_token_id=0)([packed_row(docs)])
    with torch.no_grad():
        packed = model(**model_inputs(batch, model))
        alone = [model(input_ids=d[0][None], labels=d[1][None]) for d in docs]
    # Logits of every document equal those of the document run alone.
    expected = torch.cat([a.logits[0] for a in alone])
    torch.testing.assert_close(packed.logits[0], expected, atol=1e-5, rtol=1e-5)
    # Loss: packed mean over all trainable tokens == token-weighted mean of the separate losses.
    totals = [sum_loss(a.logits, d[1][None]) for a, d in zip(alone, docs)]
    separate = sum(t[0] for t in totals) / sum(t[1] for t in totals)
    torch.testing.assert_close(packed.loss, separate, atol=1e-5, rtol=1e-5)
    s, n = sum_loss(packed.logits, batch["labels"])
    torch.testing.assert_close(s / n, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_position_ids_alone_do_not_isolate_documents(impl):
    """The known trap: restarting position_ids without the 4-D mask lets documents attend to each other."""
    model = tiny_llama(impl)
    docs = three_documents()
    batch = PackedCollator(pad_token_id=0)([packed_row(docs)])
    with torch.no_grad():
        no_mask = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = torch.cat([model(input_ids=d[0][None]).logits[0] for d in docs])
    first = len(docs[0][0])
    # The first document is unaffected (it has nothing before it) ...
    torch.testing.assert_close(no_mask[:first], alone[:first], atol=1e-5, rtol=1e-5)
    # ... but the later ones see the earlier documents.
    assert (no_mask[first:] - alone[first:]).abs().max() > 1e-2


def test_eager_needs_an_additive_mask():
    """Eager attention adds the mask to the scores: a raw bool mask is wrong, model_inputs fixes it."""
    model = tiny_llama("eager")
    docs = three_documents()
    batch = PackedCollator(pad_token_id=0)([packed_row(docs)])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=d[0][None]).logits[0] for d in docs])
        raw = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=batch["attention_mask"]).logits[0]
        fixed = model(**model_inputs(batch, model)).logits[0]
    assert (raw - alone).abs().max() > 1e-2
    torch.testing.assert_close(fixed, alone, atol=1e-5, rtol=1e-5)


def test_padded_batch_rows_match_unpadded():
    model = tiny_llama("sdpa")
    docs = three_documents()
    short = packed_row(docs[:1])
    long = packed_row(docs)
    batch = PackedCollator(pad_token_id=0)([short, long])
    with torch.no_grad():
        out = model(**model_inputs(batch, model)).logits
        alone = model(input_ids=docs[0][0][None]).logits[0]
    assert torch.isfinite(out).all()  # padding attends to itself: no empty softmax row
    torch.testing.assert_close(out[0, :len(docs[0][0])], alone, atol=1e-5, rtol=1e-5)


def test_collator_exact_values():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "seq_lengths": [2, 3], "row_index": 7},
        {"input_ids": [10, 11, 12], "labels": [10, 11, 12], "seq_lengths": [3], "row_index": 3},
    ]
    b = PackedCollator(pad_token_id=1)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]
    # First token of every document is −100 (even when the row said otherwise); padding is −100.
    assert b["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, 11, 12, -100, -100]]
    assert b["row_index"].tolist() == [7, 3]
    assert b["row_length"].tolist() == [5, 3]
    m = b["attention_mask"]
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    expected0 = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    expected1 = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m[0, 0], expected0)
    assert torch.equal(m[1, 0], expected1)


def test_flash_attention_batches_are_flattened_without_padding():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "seq_lengths": [2, 3], "row_index": 0},
        {"input_ids": [10, 11, 12], "labels": [10, 11, 12], "seq_lengths": [3], "row_index": 1},
    ]
    b = PackedCollator(pad_token_id=1)(rows)
    flat = model_inputs(b, attn_implementation="flash_attention_2")
    assert set(flat) == {"input_ids", "labels", "position_ids"}
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert flat["labels"].tolist() == [[-100, 6, -100, 8, 9, -100, 11, 12]]
    with pytest.raises(NotImplementedError, match="flex_attention"):
        model_inputs(b, attn_implementation="flex_attention")
    sdpa = model_inputs(b, attn_implementation="sdpa")
    assert "row_index" not in sdpa and "row_length" not in sdpa and sdpa["attention_mask"].dtype == torch.bool


def test_collator_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="seq_lengths"):
        PackedCollator(0)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "seq_lengths": [2], "row_index": 4}])


def test_batch_without_trainable_tokens_names_rows():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100], "seq_lengths": [3], "row_index": 11},
            # Only the first token of its 2nd document is labelled: that label is dropped, so nothing is left.
            {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "seq_lengths": [2, 1], "row_index": 12}]
    with pytest.raises(NoTrainableTokensError, match=r"\[11, 12\]"):
        PackedCollator(0)(rows)
    # One row with trainable tokens is enough for the batch.
    ok = PackedCollator(0)(rows[:1] + [{"input_ids": [5, 6], "labels": [-100, 6], "seq_lengths": [2], "row_index": 1}])
    assert int((ok["labels"] != IGNORE_INDEX).sum()) == 1


def test_packed_dataset_reads_shards_in_order(tmp_path):
    docs = random_documents(21, 50, seed=3)
    table = pack_rows(docs, 3)
    write_shards(tmp_path / "p", table, rows_per_shard=3)
    ds = PackedDataset(tmp_path / "p")
    assert len(ds) == 7
    assert len(list((tmp_path / "p").glob("shard-*.arrow"))) == 3
    for i in range(7):
        item = ds[i]
        assert item["row_index"] == i
        assert item["input_ids"].tolist() == table.column("input_ids")[i].as_py()
        assert item["labels"].tolist() == table.column("labels")[i].as_py()
        assert item["seq_lengths"].tolist() == table.column("seq_lengths")[i].as_py()
    assert ds[-1]["row_index"] == 6
    with pytest.raises(IndexError):
        ds[7]
    # Pickles (DataLoader workers) and re-opens the memory maps.
    import pickle

    again = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(again[5]["input_ids"], ds[5]["input_ids"])


def test_packed_dataset_through_dataloader(tmp_path):
    make_shards(tmp_path / "p", rows=10, rows_per_shard=4)
    ds = PackedDataset(tmp_path / "p")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=PackedCollator(0))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert [i for b in batches for i in b["row_index"].tolist()] == list(range(10))


@pytest.mark.parametrize("rows,bs,ga,ws,expected", [
    (16, 4, 1, 1, 4), (10, 3, 2, 1, 2), (10, 3, 1, 1, 4), (9, 3, 4, 1, 1), (17, 2, 2, 2, 3),
    (16, 2, 1, 2, 4), (1, 8, 1, 1, 1), (0, 8, 1, 1, 0), (33, 4, 3, 2, 2),
])
def test_steps_per_epoch_formula(rows, bs, ga, ws, expected):
    assert steps_per_epoch(rows, bs, ga, ws) == expected
