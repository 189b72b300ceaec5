"""Scheduled retraining: request a run only when the raw data changed since the last adapter."""


from dataclasses import dataclass

import dagster as dg

from assets.training import adapter_asset_key
from trainer.core.config import Experiment
from trainer.data.prepare import DataPipeline


@dataclass
class RetrainDecision:
    retrain: bool
    reason: str
    raw_version: str


def retrain_decision(exp: Experiment, instance: dg.DagsterInstance) -> RetrainDecision:
    # Hashing the source files is cheap; nothing is tokenized to decide.
    current = DataPipeline(exp, progress=False).raw_version()
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


@dataclass
class RoundDecision:
    round: int | None  # the round to run next; None: none now
    reason: str


def next_round_decision(exp: Experiment, instance: dg.DagsterInstance) -> RoundDecision:
    """Whether the loop runs another round: not while one runs, not before the starting model
    exists, not after a stop rule fired."""
    from assets.loop import LOOP_TAG, round_history, start_dependencies
    from trainer.loop.settings import loop_config, should_stop

    cfg = loop_config(exp)
    running = instance.get_runs(dg.RunsFilter(tags={LOOP_TAG: exp.name}, statuses=list(IN_PROGRESS_STATUSES)), limit=1)
    if running:
        return RoundDecision(None, f"a round of {exp.name} is in progress (run {running[0].run_id})")
    for needed in start_dependencies(exp, cfg):
        if instance.get_latest_materialization_event(needed) is None:
            return RoundDecision(None, f"the starting model ({needed.to_user_string()}) is not "
                                       "materialized yet: run the experiment first")
    history = round_history(instance, exp)
    reason = should_stop(history, cfg)
    if reason is not None:
        return RoundDecision(None, f"the loop has stopped: {reason}")
    return RoundDecision(len(history), f"round {len(history)} ({len(history)} completed)")


IN_PROGRESS_STATUSES = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                        dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


def _round_request(exp: Experiment, instance: dg.DagsterInstance, round_index: int) -> dg.RunRequest:
    from assets.loop import LOOP_TAG

    partition = str(round_index)
    # A failed round is asked for again under a new run key (a run key is launched once).
    attempts = len(instance.get_runs(dg.RunsFilter(tags={LOOP_TAG: exp.name, "dagster/partition": partition})))
    return dg.RunRequest(partition_key=partition, run_key=f"{exp.name}:round:{partition}:{attempts}")


def build_loop_automation(exp: Experiment, job) -> list:
    """The loop's sensor (launches the next round when the previous one completed) and, with
    `loop.schedule.cron`, its schedule (starts or continues the loop at those times)."""
    from assets.loop import rounds_partitions
    from trainer.loop.settings import loop_config

    cfg = loop_config(exp)
    partitions = rounds_partitions(exp)
    running = dg.DefaultSensorStatus.RUNNING if cfg.schedule.running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(name=f"{exp.name}_loop_next_round", job=job, minimum_interval_seconds=60, default_status=running,
               description=f"Launch the next round of `{exp.name}`'s loop when the previous one completed.")
    def next_round(context: dg.SensorEvaluationContext):
        decision = next_round_decision(exp, context.instance)
        if decision.round is None:
            return dg.SkipReason(decision.reason)
        return dg.SensorResult(run_requests=[_round_request(exp, context.instance, decision.round)],
                               dynamic_partitions_requests=[partitions.build_add_request([str(decision.round)])])

    automation: list = [next_round]
    if cfg.schedule.cron:
        status = dg.DefaultScheduleStatus.RUNNING if cfg.schedule.running else dg.DefaultScheduleStatus.STOPPED

        @dg.schedule(name=f"{exp.name}_loop", cron_schedule=cfg.schedule.cron, job=job,
                     execution_timezone=cfg.schedule.timezone, default_status=status,
                     description=f"Start or continue `{exp.name}`'s loop; skip with the reason otherwise.")
        def loop_schedule(context: dg.ScheduleEvaluationContext):
            decision = next_round_decision(exp, context.instance)
            if decision.round is None:
                return dg.SkipReason(decision.reason)
            context.instance.add_dynamic_partitions(partitions.name, [str(decision.round)])
            return _round_request(exp, context.instance, decision.round)

        automation.append(loop_schedule)
    return automation
