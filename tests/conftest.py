"""Shared fixtures: small experiments over data the tests write to a temp folder (no benchmark data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.core.config import Experiment, experiment_from_dict

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def small_rows(n: int = 40, seed: int = 0) -> list[dict]:
    from trainer.data.default_data import generate

    return generate("train", n, seed=seed)


@pytest.fixture
def make_experiment(tmp_path):
    """make_experiment(name, data={...}, **top_level) → Experiment rooted in tmp_path."""

    def make(name: str = "exp", data: dict | None = None, rows: list | None = None, **top) -> Experiment:
        data_file = tmp_path / "data" / "train.jsonl"
        if rows is not None or not data_file.exists():
            write_jsonl(data_file, rows if rows is not None else small_rows())
        raw = {"name": name, "store": str(tmp_path / "store"),
               "data": {"source": {"path": "data/*.jsonl"}, "max_length": 128, "rows_per_shard": 16,
                        **(data or {})},
               "tokenizer": {"path": "builtin:tiny"}, **top}
        return experiment_from_dict(raw, base_dir=tmp_path)

    return make


@pytest.fixture
def instance(tmp_path, monkeypatch):
    """A real, persistent Dagster instance (SQLite) configured by the project's own dagster.yaml."""
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    inst = dg.DagsterInstance.get()
    yield inst
    inst.dispose()


@pytest.fixture(scope="session")
def real_model_store(tmp_path_factory) -> Path:
    """One store for the tests on the real pretrained model: its GGUF is converted once a session."""
    return tmp_path_factory.mktemp("real_model_store")


@pytest.fixture(scope="session")
def smollm2_converted(real_model_store):
    """SmolLM2-135M-Instruct fetched (once per machine) and converted (once per session)."""
    from tests.real_model import fetched_gguf
    from trainer.models.convert import converted

    return converted(fetched_gguf(), real_model_store)
