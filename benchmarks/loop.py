"""The default loop experiment across seeds: per round, acceptance, coverage, held-out pass@1 and seconds.

    python benchmarks/loop.py [--experiment experiments/default_loop.yaml] [--seeds 42 43 44 45] [--rounds 3]
                              [--store DIR] [--by-task]

Each seed sets `training.seed` and `loop.generation.seed` together and runs, one seed after
another (two trainings on the same 2 cores slow each other several times):

1. `sftdag run`: the starting model (the experiment's short SFT), timed;
2. `sftdag loop --rounds N`: the rounds, timed on their own (the SFT is a cache hit by then).

The seeds share one store (a temporary folder, or `--store`), so the data assets are prepared once
(their keys do not depend on the seeds); with `--store` a rerun that changes only the `loop:`
section finds the starting models there too (cache hits: its SFT seconds are then not training).
Each seed has its own Dagster instance, because a loop's rounds are partitions named by the
experiment. The seconds of each round's steps are read from the metadata
its assets recorded. Prints a table per seed, then one across seeds. `--by-task` also scores the
starting model and each round's model on the held-out split task by task (greedy, as pass@1 is
scored): which task a round gains on and which it forgets.
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
sys.path.insert(0, str(REPO))

STEP_SECONDS = ("generate_seconds", "filter_seconds", "pack_seconds", "train_seconds", "eval_seconds")


def sftdag(args: list[str], home: Path) -> tuple[float, dict]:
    """Wall seconds and the last stdout line (JSON) of one `sftdag` command."""
    env = {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("sftdag")), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sftdag {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return elapsed, json.loads(done.stdout.strip().splitlines()[-1])


def held_out_by_task(config_path: Path, model_dirs: list[str]) -> tuple[list[dict[str, str]], dict[str, list[str]]]:
    """Per model: {task: "right/asked"} on the experiment's held-out split (a builtin source),
    answered and compared as held-out pass@1 is scored; and the first model's first wrong answers
    per task ("expected 74, answered 71"), which show how it errs."""
    from collections import Counter

    from trainer.core.config import load_experiment
    from trainer.core.template_setup import load_template_setup
    from trainer.data import default_data
    from trainer.data.prepare import DataPipeline, summarize
    from trainer.training.evaluate import answer_held_out, load_held_out

    exp = load_experiment(config_path)
    source = exp.data.eval.source
    tasks = [r["task"] for r in default_data.BUILTIN_DATASETS[source.builtin](
        source.split, source.rows or default_data.DEFAULT_TEST_ROWS, seed=source.seed)]
    prepared = summarize(DataPipeline(exp, progress=False).run())  # cache hits
    rows = load_held_out(prepared["held_out"], limit=exp.training.accuracy_rows)
    end_of_turn = load_template_setup(Path(prepared["tokenizer_dir"])).eot_token
    results, wrong = [], {}
    for model_dir in model_dirs:
        answers = answer_held_out(model_dir, rows, [end_of_turn] if end_of_turn else [], exp.training.max_new_tokens)
        asked, right = Counter(), Counter()
        for row, text in zip(rows, answers):
            task = tasks[int(row["row_id"])]
            asked[task] += 1
            right[task] += text.strip() == row["reference"].strip()
            if model_dir == model_dirs[0] and text.strip() != row["reference"].strip():
                wrong.setdefault(task, []).append(f"expected {row['reference'].strip()!r}, answered {text.strip()!r}")
        results.append({task: f"{right[task]}/{asked[task]}" for task in sorted(asked)})
    return results, {task: examples[:5] for task, examples in wrong.items()}


def run_seed(experiment: dict, seed: int, rounds: int, store: Path, work: Path, by_task: bool = False) -> dict:
    """The starting model and `rounds` rounds of the experiment with both seeds set to `seed`."""
    import dagster as dg

    from assets.loop import round_history
    from trainer.core.config import load_experiment

    config = {**experiment, "store": str(store),
              "training": {**experiment["training"], "seed": seed},
              "loop": {**experiment["loop"], "generation": {**experiment["loop"]["generation"], "seed": seed}}}
    config_path = work / f"seed-{seed}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    home = work / f"dagster_home-{seed}"
    home.mkdir()
    from_sft = experiment["loop"].get("start_model") is None
    sft_seconds, sft = sftdag(["run", str(config_path)], home) if from_sft else (0.0, {})
    loop_seconds, loop = sftdag(["loop", str(config_path), "--rounds", str(rounds)], home)
    exp = load_experiment(config_path)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        history = round_history(instance, exp)
    result = {"seed": seed, "start_pass1": sft["accuracy_after"] if from_sft else history[0]["start_pass1"],
              "sft_seconds": sft_seconds, "from_sft": from_sft, "loop_seconds": loop_seconds,
              "stopped_because": loop["stopped_because"], "rounds": history}
    if by_task:
        if from_sft:
            start = sft["merged_model_dir"]
        else:  # loop.start_model: base (the pretrained model itself) or a model directory
            from trainer.training.base_model import planned_base_model

            start = (planned_base_model(exp.model, exp.store_root, 0, exp.base_dir)
                     if exp.loop["start_model"] == "base" else str(exp.resolve_path(exp.loop["start_model"])))
        result["by_task"], result["start_wrong"] = held_out_by_task(config_path, [start, *(r["path"] for r in history)])
    return result


def print_seed(result: dict) -> None:
    start = f"SFT, {result['sft_seconds']:.0f} s" if result["from_sft"] else "the pretrained model itself"
    print(f"\nseed {result['seed']}: starting model ({start}) held-out pass@1 "
          f"{result['start_pass1']:.3f}; {len(result['rounds'])} rounds in {result['loop_seconds']:.0f} s "
          f"({result['stopped_because']})")
    print("| round | acceptance | coverage | held-out pass@1 | pass@k | generate s | train s | round s (all steps) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rounds"]:
        pass_k = next((v for k, v in r.items() if k.startswith("heldout_pass") and k != "heldout_pass1"), float("nan"))
        print(f"| {r['round']} | {r['acceptance_rate']:.3f} | {r['coverage']:.3f} | {r['heldout_pass1']:.3f} "
              f"| {pass_k:.3f} "
              f"| {r['generate_seconds']:.0f} | {r['train_seconds']:.0f} "
              f"| {sum(r.get(k, 0.0) for k in STEP_SECONDS):.0f} |", flush=True)
    if "by_task" in result:
        print("held-out right answers by task (start, then each round): " + "; ".join(
            f"{task} " + " → ".join(model[task] for model in result["by_task"]) for task in result["by_task"][0]))
        for task, examples in result["start_wrong"].items():
            print(f"the starting model's first wrong {task} answers: " + "; ".join(examples))


def by_round(result: dict, metric: str) -> str:
    return " → ".join(f"{r[metric]:.3f}" for r in result["rounds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "default_loop.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", type=Path, help="a store to keep and reuse (default: a temporary one)")
    parser.add_argument("--by-task", action="store_true", help="also score each model on the held-out split by task")
    args = parser.parse_args()

    experiment = yaml.safe_load(args.experiment.read_text())
    results = []
    with tempfile.TemporaryDirectory(prefix="sftdag-loop-") as tmp:
        store = args.store.resolve() if args.store else Path(tmp) / "store"
        for seed in args.seeds:
            results.append(run_seed(experiment, seed, args.rounds, store, Path(tmp), args.by_task))
            print_seed(results[-1])

    print("\n| seed | start pass@1 | held-out pass@1 by round | acceptance by round | rounds wall time |")
    print("| ---: | ---: | --- | --- | ---: |")
    for result in results:
        minutes, seconds = divmod(round(result["loop_seconds"]), 60)
        print(f"| {result['seed']} | {result['start_pass1']:.3f} "
              f"| {by_round(result, 'heldout_pass1')} | {by_round(result, 'acceptance_rate')} "
              f"| {minutes} min {seconds:02d} s |")


if __name__ == "__main__":
    main()
