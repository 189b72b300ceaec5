"""Key misses in training: a change to what a stage reads must change its key (else a stale output
is reused), through the real planners on real files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.train_helpers import TINY, base_vocab, held_out_rows, lora_run, write_held_out
from trainer.core.config import ConfigError
from trainer.core.store import StageOutput, Store
from trainer.training.launch import model_identity, plan_adapter, plan_merge, plan_score


def tiny_llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=base_vocab() + 2, **TINY))


def save_model(directory: Path, seed: int) -> Path:
    tiny_llama(seed).save_pretrained(str(directory), safe_serialization=True)
    return directory


def save_adapter(directory: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    model.save_pretrained(str(directory))
    return directory


def test_a_local_model_in_a_folder_named_base_model_is_keyed_by_its_weights(make_experiment, tmp_path):
    """A user's model at `…/base_model/mymodel` is not the store's GGUF conversion `mymodel`."""
    model_dir = save_model(tmp_path / "models" / "base_model" / "mymodel", seed=0)
    exp = make_experiment(name="local_base", model={"base": str(model_dir)})
    before = plan_adapter(exp)
    save_model(model_dir, seed=1)  # new weights, same folder
    after = plan_adapter(exp)
    assert after.key != before.key


def test_only_a_conversion_in_the_experiments_store_is_keyed_by_its_name(make_experiment, tmp_path):
    exp = make_experiment(name="converted_base")
    store = Store(exp.store_root)
    converted = save_model(store.path("base_model", "k1"), seed=0)
    (converted / "manifest.json").write_text("{}")  # complete: the store's conversion marker
    start = dataclasses.replace(exp, model=dataclasses.replace(exp.model, base=str(converted)))
    assert model_identity(start, str(converted)) == {"gguf": "k1"}
    # The same files elsewhere, or an incomplete conversion, are a local model: keyed by content.
    copy = save_model(tmp_path / "elsewhere" / "base_model" / "k1", seed=0)
    assert set(model_identity(start, str(copy))) == {"local"}
    (converted / "manifest.json").unlink()
    assert set(model_identity(start, str(converted))) == {"local"}


def test_an_init_adapter_retrained_in_place_changes_the_adapter_key(make_experiment, tmp_path):
    adapter_dir = save_adapter(tmp_path / "previous_adapter", seed=0)
    exp = make_experiment(name="continue", training={"lora": {"init_adapter": str(adapter_dir)}})
    before = plan_adapter(exp)
    save_adapter(adapter_dir, seed=1)  # retrained into the same directory
    after = plan_adapter(exp)
    assert after.key != before.key
    # Keyed by what it holds, not where: the same adapter copied elsewhere keeps the key.
    import shutil

    moved = shutil.copytree(adapter_dir, tmp_path / "moved")
    elsewhere = make_experiment(name="continue", training={"lora": {"init_adapter": str(moved)}})
    assert plan_adapter(elsewhere).key == after.key


def test_a_missing_init_adapter_fails_at_planning_in_one_line(make_experiment, tmp_path):
    missing = tmp_path / "no_adapter_here"
    exp = make_experiment(name="continue_missing", training={"lora": {"init_adapter": str(missing)}})
    with pytest.raises(ConfigError) as raised:
        plan_adapter(exp)
    assert str(raised.value) == f"training.lora.init_adapter: {missing}: no adapter_config.json"


def test_new_held_out_prompts_change_the_score_key_not_the_merged_key(make_experiment, tmp_path, tmp_path_factory):
    """After the eval split changes, the same merged model is scored on the new prompts (its old
    score, on the old prompts, is not reported as the new one)."""
    spec, summary = lora_run(tmp_path_factory)
    adapter = StageOutput("adapter", "adapter-1", Path(spec["output_dir"]), summary.to_dict(), cache_hit=True)
    exp = make_experiment(name="scored")
    held_out = write_held_out(tmp_path / "held_out.jsonl", held_out_rows(4))
    merge = plan_merge(exp, adapter, Path(spec["tokenizer_dir"]))
    merged = StageOutput("merged", merge.key, merge.output_dir, {}, cache_hit=True)
    first = plan_score(exp, merged, adapter, Path(spec["tokenizer_dir"]), held_out)
    write_held_out(held_out, held_out_rows(2))  # same file, other prompts
    assert plan_merge(exp, adapter, Path(spec["tokenizer_dir"])).key == merge.key  # the merged model is the same
    second = plan_score(exp, merged, adapter, Path(spec["tokenizer_dir"]), held_out)
    assert second.spec_path != first.spec_path  # its scoring spec is named by the score key
    assert second.score_key != first.score_key and second.base_score_key != first.base_score_key
    assert Store(exp.store_root).path("score", second.score_key) in second.missing()
    # No held-out prompts at all is a score of its own too.
    assert plan_score(exp, merged, adapter, Path(spec["tokenizer_dir"]), None).score_key not in (first.score_key,
                                                                                                  second.score_key)


def test_a_hub_model_is_keyed_by_the_commit_its_revision_names(make_experiment, tmp_path, monkeypatch):
    """`model.base: org/name` without a revision: the branch moving upstream is a new adapter key
    (the commit is read, offline, from the Hugging Face cache's refs, as huggingface_hub writes them)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    refs = cache / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    exp = make_experiment(name="hub_base", model={"base": "org/tiny"})
    (refs / "main").write_text("a" * 40)
    assert model_identity(exp, "org/tiny") == {"hub": "org/tiny", "commit": "a" * 40}
    (refs / "main").write_text("b" * 40)  # main moved
    assert model_identity(exp, "org/tiny")["commit"] == "b" * 40
    pinned = make_experiment(name="hub_pinned", model={"base": "org/tiny", "revision": "c" * 40})
    assert model_identity(pinned, "org/tiny")["commit"] == "c" * 40
    (refs / "main").unlink()
    with pytest.raises(ConfigError, match=r"^model\.base: model org/tiny@main: cannot resolve"):
        model_identity(exp, "org/tiny")
