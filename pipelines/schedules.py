"""Scheduled retraining: request a run only when the raw data changed since the last adapter."""


from dataclasses import dataclass

import dagster as dg

from assets.training import adapter_asset_key
from trainer.core.config import Experiment
from trainer.training.launch import raw_version
from trainer.data.prepare import DataPipeline


@dataclass
class RetrainDecision:
    retrain: bool
    reason: str
    raw_version: str


def retrain_decision(exp: Experiment, instance: dg.DagsterInstance) -> RetrainDecision:
    # Hashing the source files is cheap; nothing is tokenized to decide.
    current = raw_version(DataPipeline(exp, progress=False))
    event = instance.get_latest_materialization_event(adapter_asset_key(exp))
    if event is None or event.asset_materialization is None:
        return RetrainDecision(True, "no adapter has been trained yet", current)
    meta = event.asset_materialization.metadata
    trained_on = meta["raw_version"].value if "raw_version" in meta else None
    if trained_on != current:
        return RetrainDecision(True, f"raw data changed since the last adapter: {trained_on} → {current}", current)
    return RetrainDecision(False, f"raw data unchanged since the last adapter was trained (raw version {current})",
                           current)


def build_retrain_schedule(exp: Experiment, job) -> dg.ScheduleDefinition:
    status = dg.DefaultScheduleStatus.RUNNING if exp.schedule.running else dg.DefaultScheduleStatus.STOPPED

    @dg.schedule(name=f"{exp.name}_retrain", cron_schedule=exp.schedule.cron, job=job,
                 execution_timezone=exp.schedule.timezone, default_status=status,
                 description=f"Retrain `{exp.name}` when its raw data changed; skip with a reason otherwise.")
    def retrain(context: dg.ScheduleEvaluationContext):
        decision = retrain_decision(exp, context.instance)
        if not decision.retrain:
            return dg.SkipReason(decision.reason)
        context.log.info(decision.reason)
        # run_key: one run per raw version, even if the schedule ticks again before it finishes.
        return dg.RunRequest(run_key=f"{exp.name}:{decision.raw_version}",
                             tags={"sftdag/retrain_reason": decision.reason[:200]})

    return retrain
