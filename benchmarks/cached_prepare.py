"""A fully cached `sftdag prepare`: wall time, whether torch/transformers/mlflow get imported, and
how many times the source file is read, for this checkout and (optionally) a baseline git revision,
measured alternately in one run with the floor (`python -c "import dagster"`) and printed as ratios.

    python benchmarks/cached_prepare.py [--baseline REV] [--runs 5] [--rows 2000]

Each tree gets its own store and Dagster home in a temporary folder; one `sftdag prepare` fills
the cache, then --runs timed runs follow (floor, A, B, floor, A, B, ...). Every stage is a cache
hit in the timed runs, so what is measured is the price of finding that out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs `sftdag prepare` in-process and reports, on its last stderr line, what it imported and
# how often it opened the data file (an audit hook sees every open()).
PROBE = r"""
import json, sys
data_file = sys.argv[2]
opened = [0]
def hook(event, args):
    if event == "open" and args and str(args[0]) == data_file:
        opened[0] += 1
sys.addaudithook(hook)
from pipelines.cli import main
try:
    main(["prepare", sys.argv[1]])
finally:
    print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                      "mlflow": "mlflow" in sys.modules, "data_file_opens": opened[0]}), file=sys.stderr)
"""


def make_tree(rev: str | None, tmp: Path) -> Path:
    if rev is None:
        return REPO
    tree = tmp / f"tree-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    return tree


def prepare_once(tree: Path, work: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "DAGSTER_HOME": str(work / "dagster_home"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, str(work / "exp.yaml"), str(work / "data.jsonl")],
                          cwd=work, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"prepare failed in {tree}:\n{done.stderr[-3000:]}")
    return elapsed, json.loads(done.stderr.strip().splitlines()[-1])


def floor_once() -> float:
    """The least any `sftdag` command that runs Dagster can take: a Python importing dagster."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dagster"], check=True, capture_output=True)
    return time.perf_counter() - start


def load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"


def set_up(work: Path, rows: int) -> None:
    sys.path.insert(0, str(REPO))
    from trainer.data.default_data import generate

    work.mkdir(parents=True)
    with open(work / "data.jsonl", "w") as f:
        for r in generate("train", rows, seed=0):
            f.write(json.dumps(r) + "\n")
    (work / "exp.yaml").write_text(
        "name: cached_bench\nstore: store\n"
        "data:\n  source:\n    path: data.jsonl\n  max_length: 256\n"
        "tokenizer:\n  path: builtin:tiny\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git revision to compare against (e.g. a commit before a change)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per tree (default 5)")
    parser.add_argument("--rows", type=int, default=2000, help="rows in the generated data file (default 2000)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"this checkout": make_tree(None, tmp)}
        if args.baseline:
            trees[f"baseline {args.baseline}"] = make_tree(args.baseline, tmp)
        try:
            works = {}
            for name, tree in trees.items():
                works[name] = tmp / f"work-{len(works)}"
                set_up(works[name], args.rows)
                prepare_once(tree, works[name])  # fills the cache
            times: dict[str, list[float]] = {name: [] for name in trees}
            floor: list[float] = []
            facts: dict[str, dict] = {}
            load_before = load()
            for _ in range(args.runs):
                floor.append(floor_once())
                for name, tree in trees.items():
                    seconds, facts[name] = prepare_once(tree, works[name])
                    times[name].append(seconds)
        finally:
            for name, tree in trees.items():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)

    print(f"fully cached `sftdag prepare`, {args.rows} rows, {args.runs} runs each (median wall seconds); "
          f"before: {load_before}, after: {load()}")
    first = next(iter(trees))
    floor_s = statistics.median(floor)
    floor_name = 'floor: python -c "import dagster"'
    print(f"{floor_name:<36}{floor_s:>8.2f} s  x{floor_s / statistics.median(times[first]):.2f}")
    for name in trees:
        med = statistics.median(times[name])
        ratio = med / statistics.median(times[first])
        print(f"{name:<36}{med:>8.2f} s  x{ratio:.2f}  (x{med / floor_s:.2f} the floor)  torch imported: "
              f"{facts[name]['torch']}, transformers: {facts[name]['transformers']}, mlflow: "
              f"{facts[name].get('mlflow')}, data file opened {facts[name]['data_file_opens']} times")


if __name__ == "__main__":
    main()
