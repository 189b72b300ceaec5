"""Evaluation and promotion assets: the merged model judged by the experiment's scorers, and
registered in MLflow's model registry, its alias moved only when it is better.

`<exp>/evaluation` scores the merged model and the model it was trained from (the "before") on
the held-out prompts in its own process (`trainer.training.score`), keyed by each model, the
prompts and the scorers' code, so a changed scorer rescores without training or merging again.
Its metadata holds each scorer's pass rate before and after (Dagster plots them across
materializations), per task when the rows carry one, the held-out loss, a table of answers, and
a chart; the same figures go to the training's MLflow run with the answers as an artifact.

`<exp>/champion` registers the merged model (lineage: data version, adapter key, scores) and
moves the alias (`eval.promote.alias`, `champion`) only when the configured metric beats the
holder's; its metadata says which version holds the alias and why. The loop's rounds promote
through the same function.
"""


import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import dagster as dg

from trainer.core.config import ConfigError, Experiment
from trainer.core.graph import NODES, STAGES
from trainer.core.store import StageOutput
from trainer.training.launch import held_out_file, plan_score, score_basis
from trainer.training.spec import TrainingSummary

from .graph import asset_key, ins_and_deps
from .launch import run_step

ANSWER_ROWS_SHOWN = 8  # answers shown in the metadata (all of them are in answers.jsonl)
HELD_OUT_LOSS = "held_out_loss"


def evaluation_asset_key(exp: Experiment) -> dg.AssetKey:
    return asset_key(exp, "evaluation")


def champion_asset_key(exp: Experiment) -> dg.AssetKey | None:
    return asset_key(exp, "champion")


def final_asset_key(exp: Experiment) -> dg.AssetKey:
    """The last asset of an experiment's training: its promotion, or its evaluation without one."""
    return champion_asset_key(exp) or evaluation_asset_key(exp)


# -- what a score reports -------------------------------------------------------------------------

def score_figures(score: dict[str, Any], suffix: str = "") -> dict[str, float | int]:
    """The numbers of one score.json: each scorer's pass rate (and its errors), per task, the held-out loss."""
    figures: dict[str, float | int] = {}
    for scorer, report in (score.get("scorers") or {}).items():
        figures[f"{scorer}{suffix}"] = float(report["pass_rate"])
        if report.get("errors"):
            figures[f"{scorer}_errors{suffix}"] = int(report["errors"])
        for task, by_task in (report.get("by_task") or {}).items():
            figures[f"{scorer}/{task}{suffix}"] = float(by_task["pass_rate"])
    loss = score.get(HELD_OUT_LOSS) or {}
    if loss.get("loss") is not None:
        figures[f"{HELD_OUT_LOSS}{suffix}"] = float(loss["loss"])
        for source, by_source in (loss.get("by_source") or {}).items():
            figures[f"{HELD_OUT_LOSS}/{source}{suffix}"] = float(by_source["loss"])
    return figures


def answers_table(path: Path, rows: int = ANSWER_ROWS_SHOWN) -> str:
    """The first answers as a markdown table: what the model said, next to the reference and the verdicts."""
    lines = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if len(lines) == rows:
                    break
                lines.append(json.loads(line))
    if not lines:
        return "(no held-out answers)"

    def cell(text: Any) -> str:
        text = " ".join(str(text).split())
        return (text[:77] + "…" if len(text) > 80 else text).replace("|", "\\|")

    scorers = list(lines[0].get("outcomes", {}))
    out = ["| prompt | reference | answer | " + " | ".join(scorers) + " |", "|---" * (3 + len(scorers)) + "|"]
    for r in lines:
        out.append(f"| {cell(r['prompt_id'])} | {cell(r['reference'])} | {cell(r['answer'])} | "
                   + " | ".join(r["outcomes"][s] for s in scorers) + " |")
    return "\n".join(out)


def scores_chart(after: dict[str, float | int], before: dict[str, float | int], path: Path, title: str) -> Path | None:
    """A bar chart of every pass rate before and after (per scorer, per task): what a user looks at first."""
    names = [n for n in after if not n.startswith(HELD_OUT_LOSS) and "_errors" not in n]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.2))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [before.get(n, 0.0) for n in names], 0.4, label="before")
    ax.bar([i + 0.2 for i in x], [after[n] for n in names], 0.4, label="after")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def checkpoints_table(curve: list[tuple[int, dict[str, float | int]]]) -> str:
    """Step by step: each kept checkpoint's figures, the merged model's last."""
    names = sorted({n for _, figures in curve for n in figures})
    out = ["| step | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for step, figures in curve:
        out.append(f"| {step} | " + " | ".join(f"{figures[n]:.4g}" if n in figures else "" for n in names) + " |")
    return "\n".join(out)


def checkpoints_chart(curve: list[tuple[int, dict[str, float | int]]], path: Path, title: str) -> Path | None:
    """Each figure by training step (pass rates on the left axis, the held-out loss on the right)."""
    if len(curve) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step, _ in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    rates = sorted({n for _, f in curve for n in f if "/" not in n and not n.startswith(HELD_OUT_LOSS)
                    and "_errors" not in n})
    for name in rates:
        ax.plot(steps, [f.get(name, float("nan")) for _, f in curve], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("pass rate")
    ax.set_ylim(0, 1)
    if any(HELD_OUT_LOSS in f for _, f in curve):
        loss_ax = ax.twinx()
        loss_ax.plot(steps, [f.get(HELD_OUT_LOSS, float("nan")) for _, f in curve], color="grey", linestyle="--",
                     marker="x", label=HELD_OUT_LOSS)
        loss_ax.set_ylabel(HELD_OUT_LOSS)
        loss_ax.legend(fontsize=8, loc="upper right")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluation_metadata(merged: dict[str, Any], base: dict[str, Any] | None, answers: Path) -> dict[str, Any]:
    """Dagster metadata of an evaluation: `accuracy_merged` (the headline scorer), `accuracy_base`,
    every figure after (and `<figure>_base` before), the answers table."""
    metadata: dict[str, Any] = {}
    if merged.get("accuracy") is not None:
        metadata["accuracy_merged"] = float(merged["accuracy"])
        metadata["scored_rows"] = int(merged["scored_rows"])
        metadata["headline_scorer"] = dg.MetadataValue.text(merged["headline"])
    if base is not None and base.get("accuracy") is not None:
        metadata["accuracy_base"] = float(base["accuracy"])
    metadata.update(score_figures(merged))
    if base is not None:
        metadata.update(score_figures(base, "_base"))
    metadata["held_out_answers"] = dg.MetadataValue.md(answers_table(answers))
    metadata["answers"] = dg.MetadataValue.path(str(answers))
    return metadata


def log_evaluation(summary: TrainingSummary, figures: dict[str, float | int], files: list[Path],
                   step: int | None = None, artifact_path: str = "evaluation") -> None:
    """The figures as metrics of the training's MLflow run, the answers and chart as its artifacts."""
    if not (summary.mlflow_run_id and summary.mlflow_tracking_uri):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary.mlflow_tracking_uri)
    for name, value in figures.items():
        client.log_metric(summary.mlflow_run_id, mlflow_name(name), float(value),
                          step=step if step is not None else summary.global_step)
    for f in files:
        if f is not None and f.is_file():
            client.log_artifact(summary.mlflow_run_id, str(f), artifact_path)


def mlflow_name(figure: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . / :` and spaces: anything else (a task's name) becomes `_`."""
    return "".join(c if c.isalnum() or c in "_-./: " else "_" for c in figure)


# -- promotion ------------------------------------------------------------------------------------

def promotion_metric(exp: Experiment) -> tuple[str, bool]:
    """(the metric promotion compares, whether higher is better): `eval.promote.metric`, a scorer's
    id or `held_out_loss`; by default the headline scorer (the first)."""
    from trainer.training.scorers import experiment_scorers

    ids = [s.id for s in experiment_scorers(exp)]
    metric = exp.eval.promote.metric or ids[0]
    if metric == HELD_OUT_LOSS:
        return metric, False
    if metric not in ids:
        raise ConfigError(f"eval.promote.metric: {metric!r} is neither one of the scorers {ids} nor {HELD_OUT_LOSS}")
    return metric, True


def metric_value(score: dict[str, Any], metric: str) -> float | None:
    if metric == HELD_OUT_LOSS:
        return (score.get(HELD_OUT_LOSS) or {}).get("loss")
    report = (score.get("scorers") or {}).get(metric)
    if report is None or not report.get("rows", report.get("passed", 0) + report.get("failed", 0) + report.get("errors", 0)):
        return None
    return float(report["pass_rate"])


def registered_model_name(exp: Experiment) -> str:
    return exp.eval.promote.registered_model or exp.name


def promote_model(exp: Experiment, merged: StageOutput, score: dict[str, Any], lineage: dict[str, str],
                  run_id: str | None, rescore: Callable[[str, str | None], dict[str, Any] | None]):
    """Register `merged` (its lineage and scores as tags) and move the alias to it when it beats the
    holder (`trainer.training.registry.promote`). `rescore(model_dir, merged key)` scores a holder
    measured on other held-out prompts or scorers on this basis. Returns (version, Promotion)."""
    from trainer.training import registry
    from trainer.training.tracking import resolve_tracking

    settings = exp.eval.promote
    metric, higher = promotion_metric(exp)  # no held-out prompts: no value, registered but never promoted
    value = metric_value(score, metric)
    basis = score_basis(score)
    uri = resolve_tracking(exp)[0]
    name = registered_model_name(exp)
    tags = {**lineage, **{f"sftdag.score.{k}": str(v) for k, v in score_figures(score).items()}}
    version = registry.register(uri, name, merged.path, metric=metric, value=value, basis=basis, lineage=tags,
                                run_id=run_id)

    def rescore_holder(holder) -> float | None:
        from urllib.parse import unquote, urlparse

        source = urlparse(holder.source)
        if source.scheme not in ("", "file"):
            return None  # not a folder here: not rescored, not compared
        rescored = rescore(unquote(source.path), holder.lineage.get("merged_key"))
        return metric_value(rescored, metric) if rescored is not None else None

    decision = registry.promote(uri, name, version.version, metric=metric, value=value, basis=basis,
                                higher_is_better=higher, min_delta=settings.min_delta, alias=settings.alias,
                                rescore=rescore_holder)
    return version, decision


def promotion_metadata(exp: Experiment, decision) -> dict[str, Any]:
    settings = exp.eval.promote
    return {"registered_model": dg.MetadataValue.text(registered_model_name(exp)),
            "alias": dg.MetadataValue.text(settings.alias),
            "promoted": dg.MetadataValue.bool(decision.promoted),
            "champion_version": dg.MetadataValue.text(str(decision.champion_version)),
            "candidate_version": dg.MetadataValue.text(str(decision.version)),
            "why": dg.MetadataValue.text(decision.reason)}


# -- the assets -----------------------------------------------------------------------------------

def _asset(exp: Experiment, node: str, kinds: set[str], description: str):
    ins, deps = ins_and_deps(exp, node)
    return dg.asset(key=asset_key(exp, node), ins=ins, deps=deps, group_name=exp.name, kinds=kinds,
                    code_version=STAGES[NODES[node].stage].code_version if NODES[node].stage else None,
                    description=description)


def score_step(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
               exp: Experiment, merged: StageOutput, adapter: StageOutput, tokenizer: StageOutput,
               held_out: Path | None, base_key: str | None = None, what: str = "scoring"):
    """Plan and run the scoring of `merged` and its base (each a cache hit once scored): the step."""
    step = plan_score(exp, merged, adapter, tokenizer.path, held_out, base_key=base_key)
    run_step(context, pipes_subprocess_client, step, what)
    step.output()
    return step


def build_evaluation_assets(exp: Experiment) -> list:
    assets = []

    @_asset(exp, "evaluation", {"pytorch", "mlflow"},
            "The merged model and the model it was trained from, scored on the held-out prompts by the experiment's "
            "scorers (`eval.scorers`) with the held-out loss; runs `trainer.training.score` in its own process.")
    def evaluation(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                   **inputs) -> dg.Output:
        merged, adapter = inputs["merged_model"], inputs["trained_adapter"]
        held_out = held_out_file(inputs["templated_text"].get("eval"))
        step = score_step(context, pipes_subprocess_client, exp, merged, adapter, inputs["tokenizer"], held_out)
        after = step.score()
        before = step.score("base") if step.base_score_key else None
        metadata = {"score_version": step.score_key, **evaluation_metadata(after, before, step.answers_path())}
        figures = score_figures(after)
        figures.update(score_figures(before, "_base") if before else {})
        summary = TrainingSummary.from_dict(adapter.manifest)
        # the kept checkpoints (`training.keep_checkpoints`), then the trained model: a curve by step
        curve = [(step.score(role)["step"], score_figures(step.score(role))) for role in step.checkpoint_roles]
        if curve:
            curve.append((summary.global_step, score_figures(after)))
            metadata["checkpoints"] = dg.MetadataValue.md(checkpoints_table(curve))
        with tempfile.TemporaryDirectory() as tmp:
            chart = scores_chart(score_figures(after), score_figures(before) if before else {},
                                 Path(tmp) / "scores.png", f"{exp.name}: held-out pass rates")
            by_step = checkpoints_chart(curve, Path(tmp) / "checkpoints.png", f"{exp.name}: held-out by step")
            log_evaluation(summary, figures, [step.answers_path(), chart, by_step])
            for at, step_figures in curve[:-1]:
                log_evaluation(summary, {f"checkpoint/{n}": v for n, v in step_figures.items()}, [], step=at)
        if after.get("accuracy") is not None:
            context.log.info(f"held-out {after['headline']}: base {metadata.get('accuracy_base')} → merged "
                             f"{after['accuracy']}")
        return dg.Output(step.output(), metadata=metadata, data_version=dg.DataVersion(step.key))

    assets.append(evaluation)
    if champion_asset_key(exp) is None:
        return assets

    @_asset(exp, "champion", {"mlflow"},
            f"The merged model registered in MLflow's model registry as `{registered_model_name(exp)}`; the alias "
            f"`{exp.eval.promote.alias}` moves to it only when it beats the holder (`eval.promote`).")
    def champion(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
                 **inputs) -> dg.MaterializeResult:
        evaluation_out, merged, adapter = inputs["evaluation"], inputs["merged_model"], inputs["trained_adapter"]
        score = json.loads((evaluation_out.path / "score.json").read_text())
        summary = TrainingSummary.from_dict(adapter.manifest)
        lineage = {"sftdag.merged_key": merged.key, "sftdag.adapter_key": adapter.key,
                   "sftdag.data_version": str(summary.tags.get("data_version")), "sftdag.experiment": exp.name}

        def rescore(model_dir: str, merged_key: str | None) -> dict[str, Any] | None:
            return rescore_model(context, pipes_subprocess_client, exp, model_dir, merged_key, evaluation_out)

        version, decision = promote_model(exp, merged, score, lineage, summary.mlflow_run_id, rescore)
        context.log.info(f"{registered_model_name(exp)}: {decision.reason}")
        return dg.MaterializeResult(metadata=promotion_metadata(exp, decision))

    assets.append(champion)
    return assets


def rescore_model(context, pipes_subprocess_client, exp: Experiment, model_dir: str, merged_key: str | None,
                  evaluation_out: StageOutput) -> dict[str, Any] | None:
    """The holder's score on the candidate's held-out prompts and scorers (a cache hit when it was
    scored so before): its own scoring step, the holder's store key naming it (else its directory's identity)."""
    from trainer.training.launch import plan_model_score

    if not Path(model_dir).is_dir():
        context.log.warning(f"the holder's model {model_dir} is gone: cannot rescore it")
        return None
    held_out = evaluation_out.manifest.get("held_out")
    step = plan_model_score(exp, Path(model_dir), merged_key, Path(held_out) if held_out else None)
    run_step(context, pipes_subprocess_client, step, "scoring the holder")
    step.output()
    return step.score()
