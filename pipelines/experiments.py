"""Finding and loading the experiment YAML files a code location serves."""

from __future__ import annotations

import os
from pathlib import Path

from trainer.core.config import ConfigError, Experiment, load_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "SFTDAG_EXPERIMENTS"


def experiment_paths(spec: str | None = None) -> list[Path]:
    """YAML files from `spec` (or $SFTDAG_EXPERIMENTS): files or folders, joined by os.pathsep."""
    spec = spec if spec is not None else os.environ.get(ENV_VAR, str(REPO_ROOT / "experiments"))
    paths: list[Path] = []
    for part in filter(None, spec.split(os.pathsep)):
        p = Path(part).expanduser()
        if p.is_dir():
            paths.extend(sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")))
        elif p.is_file():
            paths.append(p)
        else:
            raise ConfigError(f"{ENV_VAR}: {p} is neither a file nor a folder")
    return paths


def load_experiments(spec: str | None = None) -> list[Experiment]:
    experiments = [load_experiment(p) for p in experiment_paths(spec)]
    names = [e.name for e in experiments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"experiment names must be unique; repeated: {duplicates}")
    return experiments
