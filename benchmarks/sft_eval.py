"""An SFT experiment judged by two scorers: held-out loss and each scorer's pass rate before and after, and where they disagree.

    python benchmarks/sft_eval.py [--experiment experiments/smollm2_sft.yaml] [--store DIR] [--set KEY=VALUE ...]

Runs `sftdag run` on a copy of the experiment (a fresh Dagster instance; the store is the
experiment's own unless `--store`, so a model conversion or training already there is reused)
whose `eval.scorers` are `[exact, {verifier: trainer.data.default_data:verify}]` unless `--set
eval.scorers=...` says otherwise. Then reads the evaluation's two scores (the merged model and the
model it was trained from, on the same held-out prompts): a table of the held-out loss and every
scorer's pass rate before and after, and, for the first two scorers, the rows whose outcomes differ
(in each model's answers), with a few examples.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop import REPO, apply_settings, model_score, read_score, sftdag  # noqa: E402

SCORERS = ["exact", {"verifier": "trainer.data.default_data:verify"}]
EXAMPLES_SHOWN = 3


def disagreements(answers: Path, first: str, second: str) -> list[dict]:
    """The answers whose outcome by `first` differs from their outcome by `second`."""
    with open(answers, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r["outcomes"][first] != r["outcomes"][second]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "smollm2_sft.yaml")
    parser.add_argument("--store", type=Path, help="the store to use (default: the experiment's own)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="set one of the experiment's settings (dotted path, YAML value); repeatable")
    args = parser.parse_args()

    import dagster as dg

    from assets.evaluation import evaluation_asset_key
    from assets.store_io import latest_metadata, latest_outputs
    from assets.training import adapter_asset_key
    from trainer.core.config import load_experiment
    from trainer.core.store import Store
    from trainer.training.spec import TrainingSummary

    experiment = apply_settings({**yaml.safe_load(args.experiment.read_text()), "eval": {"scorers": SCORERS}},
                                args.settings)
    # the copy lives elsewhere: its store named absolutely, as the original resolves it
    store_dir = args.store or args.experiment.resolve().parent / experiment["store"]
    experiment["store"] = str(Path(store_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="sftdag-sft-eval-") as tmp:
        config_path = Path(tmp) / args.experiment.name
        config_path.write_text(yaml.safe_dump(experiment, sort_keys=False))
        home = Path(tmp) / "dagster_home"
        home.mkdir()
        seconds, run = sftdag(["run", str(config_path)], home)
        exp = load_experiment(config_path)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            score_key = latest_metadata(instance, evaluation_asset_key(exp))["score_version"].value
            training = TrainingSummary.from_dict(latest_outputs(instance, adapter_asset_key(exp)).manifest)
            base_dir = training.base_model_path

    store = Store(exp.store_root)
    after, after_answers = read_score(store, score_key)
    found = model_score(store, base_dir, after.get("basis"))
    if found is None:
        raise SystemExit(f"no score of the base model {base_dir} on the evaluation's basis in {store.root}")
    before, before_answers = found
    minutes, secs = divmod(round(seconds), 60)
    print(f"`sftdag run` {minutes} min {secs:02d} s; {after['scored_rows']} held-out rows; headline {after['headline']}")
    print(f"training: {training.global_step} steps in {training.train_runtime:.0f} s, {training.tokens} tokens "
          f"({training.tokens / training.train_runtime:.0f}/s), train loss {training.train_loss:.3f}, precision "
          f"{getattr(training, 'precision', None)}, peak RSS {getattr(training, 'peak_rss_gb', None)} GB")

    scorers = list(after["scorers"])
    print("\n| model | held-out loss | " + " | ".join(scorers) + " |")
    print("| --- " + "| ---: " * (1 + len(scorers)) + "|")
    for name, score in (("before (the model trained from)", before), ("after (the merged model)", after)):
        loss = (score.get("held_out_loss") or {}).get("loss")
        print(f"| {name} | {loss:.3f} | " + " | ".join(
            f"{score['scorers'][s]['pass_rate']:.3f} ({score['scorers'][s]['passed']}/{score['scored_rows']})"
            for s in scorers) + " |")
    print()
    for task, counts in (after["scorers"][scorers[0]].get("by_task") or {}).items():
        asked = counts["passed"] + counts["failed"] + counts["errors"]
        print(f"{task} ({asked} rows), right before → after: " + ", ".join(
            f"{s} {before['scorers'][s]['by_task'][task]['passed']} → {after['scorers'][s]['by_task'][task]['passed']}"
            for s in scorers))

    if len(scorers) < 2:
        return
    first, second = scorers[:2]
    for name, answers in (("before", before_answers), ("after", after_answers)):
        differ = disagreements(answers, first, second)
        print(f"\n{name}: {first} and {second} differ on {len(differ)} of {after['scored_rows']} rows")
        for r in differ[:EXAMPLES_SHOWN]:
            print(f"  {r.get('task', '')} reference {r['reference']!r}, answer {r['answer']!r}: "
                  f"{first} {r['outcomes'][first]}, {second} {r['outcomes'][second]}")


if __name__ == "__main__":
    main()
