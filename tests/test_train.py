"""The training entry point: step counts, bad batches, resume after a kill, new-token rows, full
fine-tuning, and 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from tests.train_helpers import (
    REPO,
    TINY,
    full_run,
    held_out_rows,
    lora_run,
    make_spec,
    make_tokenizer,
    pack_rows,
    pipes_env,
    read_pipes_messages,
    train_env,
    write_shards,
)
from trainer.training.collate import NoTrainableTokensError, steps_per_epoch
from trainer.training.model_setup import base_vocab_size
from trainer.training.output import last_checkpoint, partial_dir
from trainer.training.spec import TrainingSummary
from trainer.training.train import run_training

# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("rows,bs,ga,epochs,steps,extra", [
    # 10 rows in batches of 3 = 4 micro-batches; 2 per optimizer step = 2 steps.
    (10, 3, 2, 1, 2, {}),
    # 7 rows in batches of 2 = 4 steps, twice. Also: eager attention, gradient checkpointing
    # (non-reentrant) and NEFTune on the packed path.
    (7, 2, 1, 2, 4, {"gradient_checkpointing": True, "neftune_noise_alpha": 5.0}),
])
def test_steps_per_epoch_matches_trainer(tmp_path, rows, bs, ga, epochs, steps, extra):
    spec = make_spec(tmp_path, rows=rows, training={"per_device_train_batch_size": bs,
                                                    "gradient_accumulation_steps": ga, "num_train_epochs": epochs,
                                                    **extra},
                     model={"init_kwargs": {"attn_implementation": "eager"}} if extra else None)
    summary = run_training(spec)
    assert summary.steps_per_epoch == steps_per_epoch(rows, bs, ga, 1) == steps
    assert summary.global_step == steps * epochs
    # The optimizer steps Trainer actually took, as logged one by one (logging_steps 1).
    from mlflow.tracking import MlflowClient

    history = MlflowClient(summary.mlflow_tracking_uri).get_metric_history(summary.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps * epochs + 1))


def test_batch_without_trainable_tokens_is_an_error(tmp_path):
    # Row 2 has no trainable label; with batch size 1 its batch has nothing to train on.
    docs = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([5, 6, 7, 8], [-100, 6, 7, 8]),
            ([9, 10, 11], [-100, -100, -100]), ([5, 6, 7], [-100, 6, 7])]
    write_shards(tmp_path / "train", pack_rows(docs, 1), rows_per_shard=2)
    spec = make_spec(tmp_path, training={"per_device_train_batch_size": 1, "num_train_epochs": 1,
                                         "lr_scheduler_type": "constant"})
    # The sampler shuffles, so whichever step meets row 2, the error names it.
    with pytest.raises(NoTrainableTokensError, match=r"dataset rows \[2\]"):
        run_training(spec)
    assert not Path(spec["output_dir"]).exists()


def test_wrapped_shards_train_at_any_batch_size(tmp_path):
    """Wrapped packing cuts documents anywhere; a row holding only untrained text is never written,
    so no micro-batch (batch size 1 here) comes without a trainable token."""
    from trainer.data.packing import pack

    docs = [([5, 6, 7], [-100, 6, -100]), ([8, 9, 10, 11], [-100, 9, -100, -100])] * 4
    table = pa.table({"row_id": list(range(len(docs))), "input_ids": [d[0] for d in docs],
                      "labels": [d[1] for d in docs]})
    packed = pack(table, 4, "wrapped")
    assert packed.counts["untrainable_rows_dropped"] > 0
    write_shards(tmp_path / "train", packed.table, rows_per_shard=2)
    spec = make_spec(tmp_path, training={"per_device_train_batch_size": 1})
    summary = run_training(spec)
    assert summary.global_step == packed.table.num_rows


def test_lora_trains_new_token_rows_and_writes_outputs(tmp_path_factory):
    spec, summary = lora_run(tmp_path_factory)
    out = Path(spec["output_dir"])
    assert out.is_dir() and not partial_dir(out).exists()
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
            "training_summary.json"} <= names
    assert not any(n.startswith("checkpoint-") for n in names)
    on_disk = json.loads((out / "training_summary.json").read_text())
    assert on_disk == summary.to_dict()
    # The MLflow run is closed and holds the same figures.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(on_disk["mlflow_tracking_uri"])
    run = client.get_run(on_disk["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "trainable_tokens"):
        assert run.data.metrics[key] == pytest.approx(on_disk[key]), key
    # train_loss is the mean over the run's optimizer steps (logged one by one: logging_steps 1).
    step_losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in step_losses] == [1, 2, 3, 4]
    assert on_disk["train_loss"] == pytest.approx(sum(v for _, v in step_losses) / 4, rel=1e-6)
    assert on_disk["global_step"] == 4 and on_disk["new_token_ids"] == [30, 31]
    # Every trainable label of the shards was trained on once (one epoch).
    from trainer.training.collate import PackedDataset

    shards = PackedDataset(spec["train_shards"])
    assert on_disk["trainable_tokens"] == sum(int((shards[i]["labels"] != -100).sum()) for i in range(len(shards)))
    card = (out / "README.md").read_text()
    assert "builtin:tiny-llama" in card and "dv-7" in card and "train_loss" in card

    # The new rows (embedding and untied lm_head) changed; the old rows did not.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(summary.base_model_path)
    assert base.get_input_embeddings().weight.shape[0] == 30 == base_vocab_size(tok, ["<|im_start|>", "<|im_end|>"])
    base.resize_token_embeddings(len(tok))
    before_in = base.get_input_embeddings().weight.detach().clone()
    before_out = base.get_output_embeddings().weight.detach().clone()
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    after_in = merged.get_input_embeddings().weight.detach()
    after_out = merged.get_output_embeddings().weight.detach()
    assert torch.equal(after_in[:30], before_in[:30])
    assert torch.equal(after_out[:30], before_out[:30])
    assert (after_in[30:] - before_in[30:]).abs().amax(dim=1).min() > 0
    assert (after_out[30:] - before_out[30:]).abs().amax(dim=1).min() > 0
    # The adapter stays small: no full embedding matrices in it.
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert not [k for k in keys if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")]
    assert any("trainable_tokens" in k for k in keys)


def test_new_tokens_are_trained_when_the_base_vocabulary_is_padded(tmp_path):
    """A base model with more embedding rows than the tokenizer (vocabularies padded to a multiple
    of 64 or 128): nothing is resized, yet the rows of the tokens the set-up added are trained,
    and the merged model carries them."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from trainer.training.merge import merge_adapter

    torch.manual_seed(0)
    padded = 48  # the tokenizer has 32 tokens; "<|im_start|>" and "<|im_end|>" are ids 30 and 31
    LlamaForCausalLM(LlamaConfig(vocab_size=padded, tie_word_embeddings=False, **TINY)).save_pretrained(
        tmp_path / "base")
    spec = make_spec(tmp_path, rows=16, model={"base": str(tmp_path / "base")})
    summary = run_training(spec)
    assert summary.new_token_ids == [30, 31] and summary.base_vocab_rows == padded

    merged_dir = merge_adapter(spec["output_dir"], str(tmp_path / "base"), spec["tokenizer_dir"],
                               tmp_path / "merged", summary.eot_token)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    new = torch.zeros(padded, dtype=torch.bool)
    new[[30, 31]] = True
    for get in ("get_input_embeddings", "get_output_embeddings"):
        before = getattr(base, get)().weight.detach()
        after = getattr(merged, get)().weight.detach()
        assert after.shape == before.shape == (padded, TINY["hidden_size"]), get
        assert torch.equal(after[~new], before[~new]), get  # rows of other tokens untouched
        assert (after[new] - before[new]).abs().amax(dim=1).min() > 0, get  # both new rows trained


def test_full_fine_tune(tmp_path_factory):
    spec, summary = full_run(tmp_path_factory)
    out = Path(spec["output_dir"])
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(summary.base_model_path)
    assert trained.get_input_embeddings().weight.shape[0] == 32
    w_t = dict(trained.named_parameters())
    w_b = dict(base.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(w_t[name], w_b[name])
    assert summary.global_step == 2


@pytest.mark.slow
def test_continue_training_an_existing_adapter(tmp_path, tmp_path_factory):
    from safetensors.torch import load_file

    first_spec, _ = lora_run(tmp_path_factory)
    first = Path(first_spec["output_dir"])
    # Same tokenizer (new-token ids must agree); learning rate 0: the loaded adapter comes out unchanged.
    import shutil

    shutil.copytree(first_spec["tokenizer_dir"], tmp_path / "tokenizer")
    spec = make_spec(tmp_path, rows=4, training={"learning_rate": 0.0, "max_steps": 1,
                                                 "lora": {"init_adapter": str(first)}})
    summary = run_training(spec)
    assert summary.global_step == 1
    before = load_file(str(first / "adapter_model.safetensors"))
    after = load_file(str(Path(spec["output_dir"]) / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any("lora_B" in k and before[k].abs().max() > 0 for k in before)  # a trained adapter, not a fresh one


def test_training_generates_only_the_sample_tables(tmp_path, monkeypatch):
    """Held-out answers are scored by the evaluation asset, not by the training: with
    `accuracy_rows` > 0 and no sample generations the training generates nothing; with sample
    generations it generates once, for the final sample table."""
    import trainer.training.evaluate as evaluate_module
    from mlflow.tracking import MlflowClient

    calls: list[list[str]] = []
    real_generate = evaluate_module.generate

    def counting_generate(model, tokenizer, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    # Every generation in the training process goes through it (distributed_generate imports it when called).
    monkeypatch.setattr(evaluate_module, "generate", counting_generate)
    rows = held_out_rows(4)
    for samples in (0, 2):
        spec = make_spec(tmp_path / f"samples{samples}", rows=8, held_out=rows,
                         training={"accuracy_rows": 4, "sample_generations": samples})
        calls.clear()
        summary = run_training(spec)
        assert summary.global_step == 2
        assert calls == ([[r["prompt"] for r in rows[:samples]]] if samples else [])
        assert not {"accuracy_before", "accuracy_after"} & summary.to_dict().keys()
        client = MlflowClient(summary.mlflow_tracking_uri)
        run = client.get_run(summary.mlflow_run_id)
        assert not {"accuracy_before", "accuracy_after"} & run.data.metrics.keys()
        tables = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "samples")}
        assert tables == ({"samples/final.json"} if samples else set())
        assert not (Path(spec["output_dir"]) / "sftdag_before.json").exists()
    assert [row[1] for row in _final_samples(summary)] == [r["prompt"] for r in rows[:2]]


def test_summary_written_before_the_accuracy_fields_were_dropped_still_loads(tmp_path):
    """A summary from a version whose training scored the held-out rows itself (accuracy_before,
    accuracy_after) loads, and its finished output is reused as it is."""
    spec = make_spec(tmp_path, rows=2)
    out = Path(spec["output_dir"])
    old = {"experiment": "t", "mode": "lora", "output_dir": str(out), "base_model": "builtin:tiny-llama",
           "base_model_path": str(tmp_path / "base"), "global_step": 4, "steps_per_epoch": 4, "train_rows": 16,
           "world_size": 1, "train_loss": 2.5, "trainable_tokens": 100, "tokens": 200, "train_runtime": 1.5,
           "vocab_size": 32, "base_vocab_rows": 30, "new_token_ids": [30, 31], "eot_token": "<|im_end|>",
           "tags": {"data_version": "dv-1"}, "mlflow_run_id": None, "mlflow_tracking_uri": None,
           "eval_loss": None, "accuracy_before": 0.25, "accuracy_after": 0.75, "resumed_from_step": None,
           "precision": None, "checkpoints": []}
    out.mkdir()
    (out / "training_summary.json").write_text(json.dumps(old))
    summary = TrainingSummary.read(out)
    assert summary == TrainingSummary.from_dict(old)
    # what it held, less the dropped fields; what it did not hold (later fields) unknown
    assert summary.to_dict() == {**{k: v for k, v in old.items() if k not in ("accuracy_before", "accuracy_after")},
                                 "peak_rss_gb": None, "peak_gpu_gb": None}
    assert run_training(spec) == summary  # already complete: read, not trained again
    assert not partial_dir(out).exists()


def test_completed_output_is_not_retrained(tmp_path_factory):
    spec, summary = full_run(tmp_path_factory)
    out = Path(spec["output_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_training(spec)
    assert again.global_step == summary.global_step
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_second_concurrent_training_of_one_output_is_refused(tmp_path):
    from filelock import FileLock

    spec = make_spec(tmp_path, rows=2)
    out = Path(spec["output_dir"])
    with FileLock(str(out.with_name(out.name + ".lock"))):
        with pytest.raises(RuntimeError, match="already training"):
            run_training(spec)
    assert not partial_dir(out).exists()


def test_qlora_without_cuda_fails_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    spec = make_spec(tmp_path, training={"mode": "qlora4"})
    with pytest.raises(RuntimeError, match="qlora4"):
        run_training(spec)
    assert not partial_dir(spec["output_dir"]).exists()
    assert not (tmp_path / "store" / "models").exists()


def test_base_vocab_size_strips_trailing_added_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "tok")))
    assert len(tok) == 32
    assert base_vocab_size(tok, ["<|im_start|>", "<|im_end|>"]) == 30
    assert base_vocab_size(tok, ["<|im_end|>"]) == 31
    assert base_vocab_size(tok, ["</s>"]) == 32  # an existing token is not an addition
    assert base_vocab_size(tok, []) == 32


# --------------------------------------------------------------------------------------------

def _launch(spec_path: Path, log_path: Path, extra: list[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", *(extra or ["trainer.training.train"]), str(spec_path)]
    return subprocess.Popen(cmd, cwd=str(REPO), env=train_env(env), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


RESUME_TRAINING = {"per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 2,
                   "save_total_limit": 2, "logging_steps": 1, "learning_rate": 1e-3}


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    spec = make_spec(tmp_path, rows=80, training=RESUME_TRAINING)
    spec_path = tmp_path / "spec.json"
    out = Path(spec["output_dir"])
    work = partial_dir(out)
    total = steps_per_epoch(80, 2, 1, 1)

    proc = _launch(spec_path, tmp_path / "run1.log")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpt = last_checkpoint(work)
            if ckpt is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed:\n" + (tmp_path / "run1.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = int(last_checkpoint(work).name.split("-")[1])
    assert 0 < killed_at < total and not out.exists()

    proc = _launch(spec_path, tmp_path / "run2.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "run2.log").read_text()
    log2 = (tmp_path / "run2.log").read_text()
    assert f"resuming from checkpoint-" in log2
    resumed = int(log2.split("resuming from checkpoint-")[1].split()[0])
    assert resumed >= killed_at
    assert f"step {resumed + 1}/{total}" in log2 and "step 1/" not in log2
    summary = TrainingSummary.read(out)
    assert summary.global_step == total and summary.resumed_from_step == resumed
    assert out.is_dir() and not work.exists()
    # Token counters continue from the checkpoint: they cover the whole epoch.
    assert summary.tokens == sum(sum(r) for r in _seq_lengths(spec["train_shards"]))

    # A third run finds the finished output and does not train.
    proc = _launch(spec_path, tmp_path / "run3.log")
    assert proc.wait(timeout=120) == 0
    log3 = (tmp_path / "run3.log").read_text()
    assert "already complete" in log3 and "step 1/" not in log3
    assert TrainingSummary.read(out) == summary

    # The resumed run ends where an uninterrupted run with the same settings ends (launched the
    # same way, so both use the same kernels and thread count).
    from safetensors.torch import load_file

    straight = make_spec(tmp_path / "straight", rows=80, training=RESUME_TRAINING)
    proc = _launch(tmp_path / "straight" / "spec.json", tmp_path / "straight.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()
    straight_summary = TrainingSummary.read(straight["output_dir"])
    assert straight_summary.resumed_from_step is None and straight_summary.global_step == total
    resumed_w = load_file(str(out / "adapter_model.safetensors"))
    straight_w = load_file(str(Path(straight["output_dir"]) / "adapter_model.safetensors"))
    assert resumed_w.keys() == straight_w.keys()
    # Bitwise equal: the checkpoint restores weights, optimizer and scheduler state, RNG states and
    # the data order exactly, and both runs are one CPU process with one thread (train_env), so
    # every float operation is repeated in the same order. (A tolerance would hide a resume that
    # restored, say, the optimizer moments only approximately.)
    for k in resumed_w:
        assert torch.equal(resumed_w[k], straight_w[k]), (k, (resumed_w[k] - straight_w[k]).abs().max())
    # The whole-run mean loss: the resumed run adds the logged per-step losses up to the checkpoint
    # to its own session's mean, so only the summation order differs.
    assert summary.train_loss == pytest.approx(straight_summary.train_loss, rel=1e-9)
    assert any(straight_w[k].abs().max() > 0 for k in straight_w if "lora_B" in k)  # it trained
    assert summary.tokens == straight_summary.tokens


class _Killed(BaseException):
    """Stands for a SIGKILL at one point of the finalization (raised where the kill would land)."""


FINALIZE_TRAINING = {"save_strategy": "steps", "save_steps": 2, "save_total_limit": 3}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _mlflow_runs(summary: TrainingSummary) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.mlflow_tracking_uri)
    return client.search_runs([client.get_run(summary.mlflow_run_id).info.experiment_id])


def _kill_in_finalize(at: str):
    """`finalize` killed before it deletes anything, or after the checkpoints are gone but
    before the rename."""
    import shutil

    def killed(work, output_dir):
        if at == "after_cleanup":
            for p in work.glob("checkpoint-*"):
                shutil.rmtree(p)
        raise _Killed()

    return killed


@pytest.mark.parametrize("at", ["before_cleanup", "after_cleanup"])
def test_killed_after_the_summary_completes_without_training(tmp_path, monkeypatch, at):
    import trainer.training.train as train_module

    spec = make_spec(tmp_path, rows=16, training=FINALIZE_TRAINING)
    out, work = Path(spec["output_dir"]), partial_dir(spec["output_dir"])
    monkeypatch.setattr(train_module, "finalize", _kill_in_finalize(at))
    with pytest.raises(_Killed):
        run_training(spec)
    monkeypatch.undo()
    summary = TrainingSummary.read(work)
    assert summary.global_step == 4 and not out.exists()
    assert (last_checkpoint(work) is not None) == (at == "before_cleanup")
    finished = _files(work)

    # Completed, not trained again (a training would log "loss" again and rewrite the adapter).
    again = run_training(spec)
    assert again == summary
    assert out.is_dir() and not work.exists() and not list(out.glob("checkpoint-*"))
    assert "sftdag_before.json" not in finished  # the training no longer scores the base model
    assert {k: v for k, v in _files(out).items() if k in finished} == {
        k: v for k, v in finished.items() if k != "mlflow_run_id"}
    assert "adapter_model.safetensors" in finished
    # One MLflow run, closed, its figures logged once.
    (run,) = _mlflow_runs(summary)
    assert run.info.run_id == summary.mlflow_run_id and run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.mlflow_tracking_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1


# model_card: the old order had deleted the checkpoints by then; summary: the model is saved and
# logged, the summary not yet written.
@pytest.mark.parametrize("at", ["model_card", "summary"])
def test_killed_before_the_summary_resumes_from_the_last_checkpoint(tmp_path, monkeypatch, at):
    import trainer.training.train as train_module

    spec = make_spec(tmp_path, rows=16, training=FINALIZE_TRAINING)
    out, work = Path(spec["output_dir"]), partial_dir(spec["output_dir"])

    def killed(*args, **kwargs):
        raise _Killed()

    if at == "summary":
        monkeypatch.setattr(TrainingSummary, "write", killed)
    else:
        monkeypatch.setattr(train_module, at, killed)
    with pytest.raises(_Killed):
        run_training(spec)
    monkeypatch.undo()
    assert (work / "adapter_model.safetensors").exists() and not (work / "training_summary.json").exists()
    assert last_checkpoint(work) == work / "checkpoint-4"  # the checkpoints outlive the final save

    summary = run_training(spec)
    assert summary.resumed_from_step == 4 and summary.global_step == 4  # not from step 0
    assert out.is_dir() and not work.exists() and not list(out.glob("checkpoint-*"))
    # The resumed session continued the same MLflow run: one run, closed.
    (run,) = _mlflow_runs(summary)
    assert run.info.run_id == summary.mlflow_run_id and run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.mlflow_tracking_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seq_lengths(directory: str) -> list[list[int]]:
    from trainer.training.collate import PackedDataset

    ds = PackedDataset(directory)
    return [ds[i]["seq_lengths"].tolist() for i in range(len(ds))]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """accelerate launch --cpu with 2 processes x batch 2 == 1 process x batch 4: same weights."""
    from safetensors.torch import load_file

    results = {}
    for n, bs in ((1, 4), (2, 2)):
        d = tmp_path / f"p{n}"
        d.mkdir()
        spec = make_spec(d, rows=16, eval_rows=4, held_out=held_out_rows(4),
                         training={"per_device_train_batch_size": bs, "per_device_eval_batch_size": 2,
                                   "learning_rate": 1e-2, "lr_scheduler_type": "linear", "num_train_epochs": 1,
                                   "eval_strategy": "steps", "eval_steps": 2,
                                   # equal sums need fp32: bf16's rounding depends on the batch's shape
                                   "precision": "fp32"},
                         tags={"data_version": "dv", "adapter_version": "ad-2"})
        # On a machine without a GPU, --multi_gpu runs torchrun and trainer.training.train joins the processes over
        # gloo (`--cpu` would start a single process).
        extra = ["accelerate.commands.launch", "--multi_gpu" if n > 1 else "--cpu", "--num_processes", str(n),
                 "--num_machines", "1",
                 "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
                 "-m", "trainer.training.train"]
        env, messages_path = pipes_env(d / "pipes")  # launched as Dagster would, through Pipes
        proc = _launch(d / "spec.json", d / "log.txt", extra, env)
        assert proc.wait(timeout=300) == 0, (d / "log.txt").read_text()
        summary = TrainingSummary.read(spec["output_dir"])
        assert summary.world_size == n
        # Only rank 0 talks to Dagster: one session, progress lines, one materialization.
        messages = read_pipes_messages(messages_path)
        methods = [m["method"] for m in messages]
        assert methods.count("opened") == 1 and methods.count("closed") == 1, methods
        logs = [m["params"]["message"] for m in messages if m["method"] == "log"]
        assert any("step 4/4" in line for line in logs) and any("training complete" in line for line in logs)
        (mat,) = [m["params"] for m in messages if m["method"] == "report_asset_materialization"]
        assert mat["data_version"] == "ad-2" and mat["metadata"]["global_step"]["raw_value"] == 4
        assert not [m for m in messages if m["method"] == "closed" and m["params"]]  # no exception
        assert summary.global_step == steps_per_epoch(16, bs, 1, n) == 4
        results[n] = (summary, load_file(str(Path(spec["output_dir"]) / "adapter_model.safetensors")))
    (s1, w1), (s2, w2) = results[1], results[2]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=k)
    lora_b = [k for k in w1 if "lora_B" in k]
    assert any(w1[k].abs().max() > 0 for k in lora_b)  # it trained
    assert s1.tokens == s2.tokens and s1.trainable_tokens == s2.trainable_tokens
    assert abs(s1.train_loss - s2.train_loss) < 1e-4
    assert abs(s1.eval_loss - s2.eval_loss) < 1e-3  # float reduction order differs slightly
    # Held-out generation (the final sample table) is split over the ranks and gathered in order.
    assert _final_samples(s1) == _final_samples(s2)
    assert [row[1] for row in _final_samples(s1)] == [r["prompt"] for r in held_out_rows(4)[:2]]


def _final_samples(summary: TrainingSummary) -> list[list]:
    """The rows (step, prompt, generation, reference) of the run's final sample table in MLflow."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.mlflow_tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "samples/final.json", tmp))
                           .read_text())
    assert table["columns"] == ["step", "prompt", "generation", "reference"]
    return table["data"]
