"""`training.keep_checkpoints`: the finished output keeps `checkpoints/step-<N>/` for each checkpoint
the run saved, holding only what loads the model at that step, and finishing stays re-entrant."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_helpers import REPO, make_spec, train_env
from trainer.core import keys
from trainer.core.config import ConfigError, experiment_from_dict
from trainer.training.output import finalize, keep_checkpoint, partial_dir
from trainer.training.spec import TrainingSummary
from trainer.training.train import run_training

KEEP = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "save_total_limit": None,
        "keep_checkpoints": True}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# Token ids of the base vocabulary and the two added tokens (30, 31), whose rows are trained too.
PROBE = torch.tensor([[2, 30, 5, 9, 31, 14, 7, 30, 22]])


def _train_in_subprocess(tmp: Path, training: dict) -> tuple[dict, subprocess.Popen]:
    spec = make_spec(tmp, rows=16, training=training)
    proc = subprocess.Popen([sys.executable, "-m", "trainer.training.train", str(tmp / "spec.json")], cwd=str(REPO),
                            env=train_env(), stdout=open(tmp / "train.log", "w"), stderr=subprocess.STDOUT)
    return spec, proc


def _lora_logits(summary: TrainingSummary, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(summary.base_model_path)
    base.resize_token_embeddings(summary.vocab_size)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(PROBE).logits


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_kept_checkpoints_load_the_model_at_their_step(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "plain").mkdir()
    runs = {"keep": _train_in_subprocess(tmp_path / "keep", KEEP),
            "plain": _train_in_subprocess(tmp_path / "plain", {**KEEP, "keep_checkpoints": False})}
    for name, (_, proc) in runs.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / name / "train.log").read_text()

    spec, _ = runs["keep"]
    out = Path(spec["output_dir"])
    summary = TrainingSummary.read(out)
    assert summary.global_step == 4
    assert summary.checkpoints == [{"step": 2, "path": "checkpoints/step-2"}, {"step": 4, "path": "checkpoints/step-4"}]
    assert not partial_dir(out).exists() and not list(out.glob("checkpoint-*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    for kept in summary.checkpoints:  # the adapter only: no optimizer, scheduler, RNG or trainer state
        assert {p.name for p in (out / kept["path"]).iterdir()} == ADAPTER_FILES
    # The final adapter stays where it was, and the card names the kept checkpoints.
    assert ADAPTER_FILES <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "## Checkpoints" in card and "`checkpoints/step-2`" in card and "`checkpoints/step-4`" in card

    final = _lora_logits(summary, out)
    assert torch.equal(_lora_logits(summary, out / "checkpoints/step-4"), final)
    assert (_lora_logits(summary, out / "checkpoints/step-2") - final).abs().max() > 1e-4

    plain_out = Path(runs["plain"][0]["output_dir"])
    plain = TrainingSummary.read(plain_out)
    assert plain.checkpoints == [] and plain.global_step == 4
    assert not (plain_out / "checkpoints").exists() and not list(plain_out.glob("checkpoint-*"))
    assert "## Checkpoints" not in (plain_out / "README.md").read_text()
    # Same settings, same data: keeping checkpoints changes nothing of the final adapter.
    assert torch.equal(_lora_logits(plain, plain_out), final)


def _experiment(**training):
    return experiment_from_dict({"name": "t", "training": training})


def _adapter_key_params(**training):
    return keys.adapter_params(_experiment(**training), {"builtin": "m"}, "tok")


def test_keep_checkpoints_enters_the_adapter_key():
    plain = _adapter_key_params(save_steps=2)
    kept = _adapter_key_params(save_steps=2, keep_checkpoints=True)
    assert kept != plain and kept["training"]["keep_checkpoints"] is True
    # Off, it stays out of the key: adapters trained before the setting existed keep their keys.
    assert "keep_checkpoints" not in plain["training"]
    assert _adapter_key_params(save_steps=2, keep_checkpoints=False) == plain
    # The checkpoint cadence decides which checkpoints the output holds only when they are kept.
    for cadence in ({"save_steps": 3}, {"save_total_limit": None}, {"save_strategy": "epoch"}):
        assert _adapter_key_params(**{"save_steps": 2, **cadence}) == plain, cadence
        assert _adapter_key_params(**{"save_steps": 2, **cadence, "keep_checkpoints": True}) != kept, cadence


def test_keeping_checkpoints_that_are_never_saved_is_refused():
    with pytest.raises(ConfigError, match=r'training\.keep_checkpoints: .*training\.save_strategy is "no"'):
        _experiment(keep_checkpoints=True, save_strategy="no")


class _Killed(BaseException):
    """Stands for a SIGKILL (raised where the kill would land)."""


def _killed(*args, **kwargs):
    raise _Killed()


def _moved_first(work: Path) -> None:
    keep_checkpoint(work, 2, work / "checkpoints/step-2")


def _second_half_pruned(work: Path) -> None:
    _moved_first(work)
    for name in ("optimizer.pt", "trainer_state.json", "tokenizer.json"):
        (work / "checkpoint-4" / name).unlink()


def _second_pruned_not_moved(work: Path) -> None:
    _moved_first(work)
    for p in (work / "checkpoint-4").iterdir():
        if p.name not in ADAPTER_FILES:
            p.unlink()


def _all_moved_with_a_stale_checkpoint(work: Path) -> None:
    _moved_first(work)
    keep_checkpoint(work, 4, work / "checkpoints/step-4")
    shutil.copytree(work / "checkpoints/step-2", work / "checkpoint-1")  # not kept: deleted


def _only_the_rename_left(work: Path) -> None:
    _moved_first(work)
    keep_checkpoint(work, 4, work / "checkpoints/step-4")
    for name in ("mlflow_run_id", "sftdag_before.json"):
        (work / name).unlink(missing_ok=True)


HALF_DONE = {"moved_first": _moved_first, "second_half_pruned": _second_half_pruned,
             "second_pruned_not_moved": _second_pruned_not_moved,
             "all_moved_with_a_stale_checkpoint": _all_moved_with_a_stale_checkpoint,
             "only_the_rename_left": _only_the_rename_left}


def test_finalize_killed_half_way_completes_with_every_kept_checkpoint(tmp_path, monkeypatch):
    import trainer.training.train as train_module

    spec = make_spec(tmp_path / "run", rows=16, training=KEEP)
    out, work = Path(spec["output_dir"]), partial_dir(spec["output_dir"])
    monkeypatch.setattr(train_module, "finalize", _killed)  # killed once the summary is written
    with pytest.raises(_Killed):
        run_training(spec)
    monkeypatch.undo()
    assert {p.name for p in work.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    copies = {}
    for name, half_done in HALF_DONE.items():
        copies[name] = shutil.copytree(work, tmp_path / name / "out.partial")
        half_done(copies[name])
    lost = shutil.copytree(work, tmp_path / "lost" / "out.partial")
    shutil.rmtree(lost / "checkpoint-2")

    # Untouched, the next run completes it without training again.
    summary = run_training(spec)
    assert summary.resumed_from_step is None and [c["step"] for c in summary.checkpoints] == [2, 4]
    expected = _tree(out)
    assert {k for k in expected if k.startswith("checkpoints/")} == {
        f"checkpoints/step-{step}/{name}" for step in (2, 4) for name in ADAPTER_FILES}

    # Killed at any later point, the next call ends with the same result.
    for name, copy in copies.items():
        finalize(copy, copy.with_name("out"))
        assert not copy.exists() and _tree(copy.with_name("out")) == expected, name
    # A kept checkpoint gone before it was moved (deleted by hand) is an error, not dropped.
    with pytest.raises(RuntimeError, match=r"checkpoint-2, kept by training_summary\.json, is gone"):
        finalize(lost, lost.with_name("out"))
    assert lost.is_dir() and not lost.with_name("out").exists()


def test_full_fine_tune_keeps_loadable_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    spec = make_spec(tmp_path, rows=8, training={**KEEP, "mode": "full", "learning_rate": 1e-3, "max_steps": 2,
                                                 "save_steps": 1})
    out = Path(spec["output_dir"])
    summary = run_training(spec)
    assert [c["step"] for c in summary.checkpoints] == [1, 2]

    def logits(directory: Path) -> torch.Tensor:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(str(directory)).eval()(PROBE).logits

    for kept in summary.checkpoints:
        names = {p.name for p in (out / kept["path"]).iterdir()}
        assert {"config.json", "model.safetensors"} <= names
        assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
    final = logits(out)
    assert torch.equal(logits(out / "checkpoints/step-2"), final)
    assert (logits(out / "checkpoints/step-1") - final).abs().max() > 1e-4
