"""`sftdag explain`: after a materialization, a template edit, a data append and a training-only
change each name what changed, on the stages they change and no others."""

import json
import os
import re
import subprocess
import sys

import yaml

from pipelines.cli import materialize_experiment
from pipelines.explain import explain
from trainer.core.config import load_experiment

from .conftest import small_rows, write_jsonl
from .train_helpers import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_experiment(tmp_path, max_length=128, **training) -> str:
    write_jsonl(tmp_path / "data" / "train.jsonl", small_rows(24))
    (tmp_path / "chat.jinja").write_text(CHATML)
    config = {"name": "explained", "store": "store",
              "data": {"source": {"path": "data/train.jsonl"}, "max_length": max_length, "template": {"source": "chat.jinja"},
                       "checks": {"min_packing_efficiency": 0.0}},
              "tokenizer": {"path": "builtin:tiny"},
              "model": {"base": "builtin:tiny-llama", "builtin_config": dict(TINY)},
              "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                           "save_strategy": "no", "accuracy_rows": 0, "sample_generations": 0,
                           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **training},
              }
    path = tmp_path / "explained.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def lines_of(text: list[str], label: str) -> list[str]:
    """The line of stage `label` and the change lines under it."""
    start = next(i for i, line in enumerate(text) if line.split()[0] == label)
    block = [text[start]]
    for line in text[start + 1:]:
        if not line.startswith(" "):
            break
        block.append(line.strip())
    return block


def test_unchanged_after_materializing(tmp_path, instance):
    exp = load_experiment(write_experiment(tmp_path))
    before = explain(exp, instance)
    assert all("never materialized" in line for line in before[1:])
    materialize_experiment(exp, "data", instance, verbose=False)
    after = explain(exp, instance)
    for label in ("tokenizer", "raw/train", "templated/train", "tokenized/train", "packed/train"):
        assert lines_of(after, label)[0].endswith("in store   = last materialized"), after


def test_template_edit_names_the_template_file_and_the_stages_it_reaches(tmp_path, instance):
    exp = load_experiment(write_experiment(tmp_path))
    materialize_experiment(exp, "data", instance, verbose=False)
    (tmp_path / "chat.jinja").write_text(CHATML.replace("<|im_end|>\n", "<|im_end|>\n\n"))
    text = explain(load_experiment(tmp_path / "explained.yaml"), instance)
    tokenizer = lines_of(text, "tokenizer")
    assert "not built" in tokenizer[0]
    assert any(line.startswith("params.made_from.template_file: ") for line in tokenizer), tokenizer
    assert any(line.startswith("params.identity: ") for line in tokenizer)
    templated = lines_of(text, "templated/train")
    assert templated[1].startswith("input tokenizer: ") and len(templated) == 2, templated
    assert lines_of(text, "tokenized/train")[1].startswith("input templated: ")
    assert lines_of(text, "raw/train")[0].endswith("= last materialized")  # the data did not change


def test_data_append_names_the_source_and_nothing_else(tmp_path, instance):
    exp = load_experiment(write_experiment(tmp_path))
    materialize_experiment(exp, "data", instance, verbose=False)
    with open(tmp_path / "data" / "train.jsonl", "a") as f:  # rows appended
        f.writelines(json.dumps(row) + "\n" for row in small_rows(30, seed=1)[:6])
    text = explain(load_experiment(tmp_path / "explained.yaml"), instance)
    raw = lines_of(text, "raw/train")
    assert "not built" in raw[0] and len(raw) > 1
    assert all(line.startswith("params.source") for line in raw[1:]), raw
    assert any(".digest: " in line for line in raw[1:]), raw
    assert lines_of(text, "tokenizer")[0].endswith("= last materialized")
    assert lines_of(text, "templated/train")[1:] == [lines_of(text, "templated/train")[1]]
    assert lines_of(text, "templated/train")[1].startswith("input raw: ")


def test_training_only_change_names_the_setting_and_keeps_the_data(tmp_path, instance):
    exp = load_experiment(write_experiment(tmp_path))
    materialize_experiment(exp, "model", instance, verbose=False)
    changed = write_experiment(tmp_path, learning_rate=2e-3)
    text = explain(load_experiment(changed), instance, "adapter")
    for label in ("tokenizer", "raw/train", "templated/train", "tokenized/train", "packed/train"):
        assert lines_of(text, label)[0].endswith("in store   = last materialized"), text
    adapter = lines_of(text, "adapter")
    assert "not built" in adapter[0]
    assert adapter[1:] == ["params.training.learning_rate: 0.001 → 0.002"], adapter
    assert not any(line.split()[0] in ("merged", "score") for line in text)  # only what the adapter is made of

    # A data setting renames the (unnamed) data group: the last keys come from the adapter's record.
    text = explain(load_experiment(write_experiment(tmp_path, max_length=96)), instance, "adapter")
    packed = lines_of(text, "packed/train")
    assert "adapter's last input" in packed[0] and packed[1:] == ["params.max_length: 128 → 96"], text
    assert lines_of(text, "tokenized/train")[0].endswith("= packed/train's last input"), text
    now, before = re.fullmatch(r"packed/train +(\w+) .* last input (\w+), since then:", packed[0]).groups()
    assert lines_of(text, "adapter")[1:] == [f"input packed/train: {before} → {now}"], text


def test_the_command_prints_it(tmp_path):
    path = write_experiment(tmp_path)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    assert run("prepare", path).returncode == 0
    proc = run("explain", path, "templated")
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert labels == ["tokenizer", "raw/train", "templated/train"]
    proc = run("explain", path, "nonsense")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("sftdag: no stage 'nonsense'")
