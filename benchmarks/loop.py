"""A loop experiment across seeds: per round, held-out pass@1 by the experiment's scorers, pass@k, loss, acceptance.

    python benchmarks/loop.py [--experiment experiments/default_loop.yaml] [--seeds 42 43 44 45] [--rounds 3]
                              [--store DIR] [--by-task] [--set KEY=VALUE ...]

Each seed sets `training.seed` and `loop.generation.seed` together and runs, one seed after
another (two trainings on the same 2 cores slow each other several times):

1. `sftdag run`: the starting model (the experiment's short SFT), timed;
2. `sftdag loop --rounds N`: the rounds, timed on their own (the SFT is a cache hit by then).

`--set loop.training.replay=0.1` changes one setting of the experiment (a dotted YAML path, the
value read as YAML: `--set eval.scorers='[{verifier: trainer.data.default_data:verify}, exact]'`);
repeat it for several. The seeds share one store (a temporary folder, or `--store`), so the data
assets are prepared once (their keys do not depend on the seeds); with `--store` a rerun that
changes only the `loop:` section finds the starting models there too (cache hits: its SFT seconds
are then not training). Each seed has its own Dagster instance, because a loop's rounds are
partitions named by the experiment.

Every figure is what the rounds recorded (round_eval's metadata) or the scores they wrote in the
store: held-out pass@1 by the headline scorer (the first of `eval.scorers`; by default a loop's
verifier), exact match beside it when `exact` is among the scorers, the unbiased pass@k, the
held-out loss; the starting model's from its own score on the same held-out prompts by the same
scorers. `--by-task` adds the right answers per task by the headline scorer (start, then each
round) and the starting model's first wrong answers per task, which show how it errs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEP_SECONDS = ("generate_seconds", "filter_seconds", "pack_seconds", "train_seconds", "eval_seconds")
PASS_AT_K = re.compile(r"heldout_pass(\d+)$")
LOSS = "heldout_held_out_loss"
WRONG_SHOWN = 3  # the starting model's wrong answers shown per task


def apply_settings(experiment: dict, settings: list[str]) -> dict:
    """The experiment with each `KEY=VALUE` of `settings` set (KEY a dotted path, VALUE read as YAML)."""
    experiment = copy.deepcopy(experiment)
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key.strip("."):
            raise SystemExit(f"--set {setting!r}: expected KEY=VALUE (e.g. loop.training.replay=0.1)")
        *sections, name = key.split(".")
        node = experiment
        for depth, section in enumerate(sections):
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {key}: {'.'.join(sections[:depth + 1])} is {node!r}, not a section")
        try:
            node[name] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SystemExit(f"--set {key}: {text!r} is not a YAML value: {' '.join(str(e).split())}") from None
    return experiment


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


def read_score(store, key: str) -> tuple[dict, Path]:
    """(score.json, answers.jsonl's path) of the score `key` in the store."""
    from trainer.core.schemas import SCORE
    from trainer.training.score import ANSWERS

    path = store.get("score", key).path
    return json.loads((path / SCORE).read_text()), path / ANSWERS


def model_score(store, model_dir: str, basis: str | None) -> tuple[dict, Path] | None:
    """(score.json, answers.jsonl's path) of the model at `model_dir` measured on `basis` (the
    held-out prompts, rows and scorers: a loop's starting model, the "before" of every round, on
    the rounds' basis), the newest should the store hold several; None when it has none."""
    from trainer.core.graph import MANIFEST

    found = []
    for path in (store.root / "score").glob("*"):
        if (path / MANIFEST).is_file() and store.has("score", path.name):
            manifest = json.loads((path / MANIFEST).read_text())  # what was scored (score.json: the figures)
            if manifest.get("model_dir") and Path(manifest["model_dir"]).resolve() == Path(model_dir).resolve():
                score, answers = read_score(store, path.name)
                if score.get("basis") == basis:
                    found.append((manifest.get("created", 0.0), score, answers))
    return max(found, key=lambda f: f[0])[1:] if found else None


def right_by_task(score: dict, scorer: str) -> dict[str, str]:
    """{task: "right/asked"} by `scorer` (errors count as asked, never as right)."""
    by_task = ((score.get("scorers") or {}).get(scorer) or {}).get("by_task") or {}
    return {task: f"{t['passed']}/{t['passed'] + t['failed'] + t['errors']}" for task, t in by_task.items()}


def wrong_answers(answers: Path, scorer: str) -> dict[str, list[str]]:
    """The first answers `scorer` did not pass, per task ("expected '74', answered '71'")."""
    wrong: dict[str, list[str]] = {}
    with open(answers, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["outcomes"][scorer] != "pass":
                examples = wrong.setdefault(record.get("task", "(no task)"), [])
                if len(examples) < WRONG_SHOWN:
                    examples.append(f"expected {record['reference'].strip()!r}, answered {record['answer'].strip()!r}")
    return wrong


def run_seed(experiment: dict, seed: int, rounds: int, store_dir: Path, work: Path, by_task: bool = False) -> dict:
    """The starting model and `rounds` rounds of the experiment with both seeds set to `seed`."""
    import dagster as dg

    from assets.loop import round_history
    from trainer.core.config import load_experiment
    from trainer.core.store import Store
    from trainer.training.scorers import experiment_scorers

    config = {**experiment, "store": str(store_dir),
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
    scorers = [s.id for s in experiment_scorers(exp)]
    store = Store(exp.store_root)
    scores = [read_score(store, r["score_version"])[0] for r in history]
    if from_sft:
        start_dir = sft["merged_model_dir"]
    else:  # loop.start_model: base (the pretrained model itself) or a model directory
        from trainer.training.base_model import planned_base_model

        start_dir = (planned_base_model(exp.model, exp.store_root, 0, exp.base_dir)
                     if exp.loop["start_model"] == "base" else str(exp.resolve_path(exp.loop["start_model"])))
    start = model_score(store, start_dir, scores[0].get("basis")) if scores else None
    result = {"seed": seed, "headline": scorers[0], "exact": "exact" in scorers[1:],
              "start": start[0] if start else None, "start_pass1": history[0]["start_pass1"] if history else None,
              "sft_seconds": sft_seconds, "from_sft": from_sft, "loop_seconds": loop_seconds,
              "stopped_because": loop["stopped_because"], "rounds": history}
    if by_task and start:
        result["by_task"] = [right_by_task(s, scorers[0]) for s in (start[0], *scores)]
        result["start_wrong"] = wrong_answers(start[1], scorers[0])
    return result


def figure(value, digits: int = 3) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def start_figures(result: dict) -> dict:
    """The starting model's figures in a round's names (blank where it has none)."""
    score = result["start"] or {}
    scorers = score.get("scorers") or {}
    return {"heldout_pass1": result["start_pass1"],
            "heldout_exact": (scorers.get("exact") or {}).get("pass_rate"),
            LOSS: (score.get("held_out_loss") or {}).get("loss")}


def pass_at_k(r: dict) -> tuple[str, float | None]:
    """("pass@8", its value) of a round (k from the name the round recorded it under)."""
    for name, value in r.items():
        m = PASS_AT_K.match(name)
        if m and m.group(1) != "1":
            return f"pass@{m.group(1)}", value
    return "pass@k", None


def print_seed(result: dict) -> None:
    start = f"SFT, {result['sft_seconds']:.0f} s" if result["from_sft"] else "the pretrained model itself"
    print(f"\nseed {result['seed']}: starting model: {start}; {len(result['rounds'])} rounds in "
          f"{result['loop_seconds']:.0f} s ({result['stopped_because']})")
    k_name = pass_at_k(result["rounds"][0])[0] if result["rounds"] else "pass@k"
    replays = any(r.get("replayed_rows") for r in result["rounds"])
    columns = ["round", f"pass@1 ({result['headline']})", *(["exact"] if result["exact"] else []), k_name,
               "held-out loss", "acceptance", "coverage", *(["replayed rows"] if replays else []),
               "generate s", "train s", "round s (all steps)"]
    print("| " + " | ".join(columns) + " |\n" + "| ---: " * len(columns) + "|")
    for r in [{**start_figures(result), "round": "start"}, *result["rounds"]]:
        cells = [str(r["round"]), figure(r["heldout_pass1"]), *([figure(r.get("heldout_exact"))] if result["exact"] else []),
                 figure(pass_at_k(r)[1]), figure(r.get(LOSS)), figure(r.get("acceptance_rate")),
                 figure(r.get("coverage")), *([str(r.get("replayed_rows", ""))] if replays else []),
                 figure(r.get("generate_seconds"), 0), figure(r.get("train_seconds"), 0),
                 figure(sum(r[k] for k in STEP_SECONDS if k in r) if "train_seconds" in r else None, 0)]
        print("| " + " | ".join(cells) + " |", flush=True)
    if "by_task" in result:
        print(f"held-out right answers by task ({result['headline']}; start, then each round): " + "; ".join(
            f"{task} " + " → ".join(model.get(task, "-") for model in result["by_task"])
            for task in result["by_task"][0]))
        for task, examples in sorted(result["start_wrong"].items()):
            print(f"the starting model's first wrong {task} answers: " + "; ".join(examples))


def by_round(result: dict, metric: str) -> str:
    return " → ".join(figure(r.get(metric)) for r in result["rounds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "default_loop.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", type=Path, help="a store to keep and reuse (default: a temporary one)")
    parser.add_argument("--by-task", action="store_true", help="also the right held-out answers per task")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="set one of the experiment's settings (dotted path, YAML value); repeatable")
    args = parser.parse_args()

    experiment = apply_settings(yaml.safe_load(args.experiment.read_text()), args.settings)
    results = []
    with tempfile.TemporaryDirectory(prefix="sftdag-loop-") as tmp:
        store = args.store.resolve() if args.store else Path(tmp) / "store"
        for seed in args.seeds:
            results.append(run_seed(experiment, seed, args.rounds, store, Path(tmp), args.by_task))
            print_seed(results[-1])

    exact = any(result["exact"] for result in results)
    k_name = next((pass_at_k(r["rounds"][0])[0] for r in results if r["rounds"]), "pass@k")
    print(f"\n| seed | start pass@1 | pass@1 ({results[0]['headline']}) by round | "
          + ("exact by round | " if exact else "") + f"{k_name} by round | held-out loss by round "
          "| acceptance by round | coverage by round | rounds wall time |")
    print("| ---: " * 2 + "| --- " * (5 + exact) + "| ---: |")
    for result in results:
        minutes, seconds = divmod(round(result["loop_seconds"]), 60)
        k_values = " → ".join(figure(pass_at_k(r)[1]) for r in result["rounds"])
        print(f"| {result['seed']} | {figure(result['start_pass1'])} | {by_round(result, 'heldout_pass1')} "
              + (f"| {by_round(result, 'heldout_exact')} " if exact else "")
              + f"| {k_values} | {by_round(result, LOSS)} | {by_round(result, 'acceptance_rate')} "
              f"| {by_round(result, 'coverage')} | {minutes} min {seconds:02d} s |")


if __name__ == "__main__":
    main()
