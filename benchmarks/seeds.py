"""The default experiment across training seeds: held-out accuracy and wall time per seed.

    python benchmarks/seeds.py [--experiment experiments/default.yaml] [--seeds 42 43 44]

Each seed is one `sftdag run` (a process, as `make run` starts it) of the experiment with only
`training.seed` changed, one after another: two trainings on the same cores slow each other
several times. The runs share one store in a temporary folder, so the data assets are prepared
by the first run and are cache hits afterwards (the data key does not depend on the training
seed); every run trains, merges and scores its own model. The accuracies are what `sftdag run`
prints (its last line, JSON), which come from the evaluation asset's score (`score.json`): the
headline scorer's pass rate (`scorer`; exact match unless `eval.scorers` says otherwise) of the
base model (`accuracy_before`) and of the merged model (`accuracy_after`) on the first
`training.accuracy_rows` held-out rows; the training process itself scores nothing. The last
lines are a table and the minimum accuracy over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_seed(experiment: dict, seed: int, work: Path) -> tuple[float, dict]:
    """Wall seconds and the CLI's result (its JSON line) of one `sftdag run` with `training.seed` = seed."""
    config = {**experiment, "store": str(work / "store"),
              "training": {**experiment["training"], "seed": seed}}
    config_path = work / f"seed-{seed}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "DAGSTER_HOME": str(work / "dagster_home"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    (work / "dagster_home").mkdir(exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("sftdag")), "run", str(config_path)],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: sftdag run failed:\n{done.stderr[-3000:]}")
    return elapsed, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "default.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    args = parser.parse_args()

    experiment = yaml.safe_load(args.experiment.read_text())
    # Thread count changes the float kernels (and contended speed): print it with the figures.
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="sftdag-seeds-") as tmp:
        for seed in args.seeds:
            elapsed, summary = run_seed(experiment, seed, Path(tmp))
            results.append((seed, elapsed, summary))
            print(f"seed {seed}: {elapsed:.0f} s, accuracy ({summary['scorer']}) {summary['accuracy_before']:.3f} -> "
                  f"{summary['accuracy_after']:.3f}", flush=True)

    print("\n| seed | wall time | accuracy before | accuracy after (merged model) |")
    print("| ---: | ---: | ---: | ---: |")
    for seed, elapsed, summary in results:
        minutes, seconds = divmod(round(elapsed), 60)
        print(f"| {seed} | {minutes} min {seconds:02d} s | {summary['accuracy_before']:.3f} "
              f"| {summary['accuracy_after']:.3f} |")
    print(f"\nminimum accuracy after: {min(s['accuracy_after'] for _, _, s in results):.3f}")


if __name__ == "__main__":
    main()
