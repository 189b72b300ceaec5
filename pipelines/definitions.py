"""The Dagster code location: assets, checks, jobs and schedules for every experiment YAML
(`defs`, built when Dagster loads it; the CLI builds only the assets of the experiment it runs)."""


import dagster as dg

from assets.data import build_data_assets, data_asset_key
from assets.models import base_model_asset_key, build_base_model_asset
from assets.store_io import StageStoreIOManager
from trainer.core.config import ConfigError, Experiment

from .experiments import load_experiments
from .liveness import dead_run_sensor


def data_groups(experiments: list[Experiment]) -> dict[str, Experiment]:
    """One experiment per data group; experiments sharing a group must share its data settings."""
    groups: dict[str, Experiment] = {}
    for exp in experiments:
        first = groups.setdefault(exp.data_group, exp)
        if first.data_fingerprint() != exp.data_fingerprint():
            raise ConfigError(f"experiments {first.name!r} and {exp.name!r} both use data group "
                              f"{exp.data_group!r} but their data settings differ; give one another data.name")
    return groups


def base_models(experiments: list[Experiment]) -> dict[str, Experiment]:
    """One experiment per GGUF base-model asset; one asset name must name one file."""
    models: dict[str, Experiment] = {}
    for exp in experiments:
        key = base_model_asset_key(exp)
        if key is None:
            continue
        first = models.setdefault(key.to_user_string(), exp)
        if first.resolve_path(first.model.base) != exp.resolve_path(exp.model.base):
            raise ConfigError(f"experiments {first.name!r} and {exp.name!r} name different GGUF files "
                              f"({first.model.base!r}, {exp.model.base!r}) that would share the asset "
                              f"{key.to_user_string()}; rename one of the files")
    return models


def train_job_name(exp: Experiment) -> str:
    return f"{exp.name}_train"


def loop_job_name(exp: Experiment) -> str:
    return f"{exp.name}_loop_round"


def build_definitions(experiments: list[Experiment]) -> dg.Definitions:
    # Here, not at the top: `sftdag prepare` imports this module and needs none of them.
    from assets.evaluation import build_evaluation_assets, final_asset_key
    from assets.loop import build_loop_assets, loop_tags
    from assets.training import GPU_TAG, build_training_assets

    from .schedules import build_loop_automation, build_retrain_schedule

    assets: list = []
    jobs: list = []
    schedules: list = []
    sensors: list = [dead_run_sensor]
    for group, exp in data_groups(experiments).items():
        assets += build_data_assets(exp)
        jobs.append(dg.define_asset_job(f"{group}_prepare",
                                        selection=dg.AssetSelection.assets(data_asset_key(group, "packed")).upstream()
                                        .materializable(),
                                        description=f"Prepare the packed shards of data group {group}"))
    for exp in base_models(experiments).values():
        assets.append(build_base_model_asset(exp))
    for exp in experiments:
        assets += build_training_assets(exp) + build_evaluation_assets(exp)
        tags = {GPU_TAG: "true"} if exp.training.gpu else {}
        job = dg.define_asset_job(train_job_name(exp),
                                  selection=dg.AssetSelection.assets(final_asset_key(exp)).upstream().materializable(),
                                  tags=tags, description=f"Data → adapter → merged model → evaluation (→ promotion) "
                                                         f"for {exp.name}")
        jobs.append(job)
        if exp.schedule.cron:
            schedules.append(build_retrain_schedule(exp, job))
        if exp.loop is not None:
            round_assets = build_loop_assets(exp)
            assets += round_assets
            loop_job = dg.define_asset_job(loop_job_name(exp), selection=dg.AssetSelection.assets(*round_assets),
                                           tags=loop_tags(exp),  # partitioned by the round assets' partitions
                                           description=f"One round of {exp.name}'s generate → filter → train loop")
            jobs.append(loop_job)
            automation = build_loop_automation(exp, loop_job)
            sensors += [a for a in automation if isinstance(a, dg.SensorDefinition)]
            schedules += [a for a in automation if isinstance(a, dg.ScheduleDefinition)]
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules, sensors=sensors,
                          resources=resources())


def resources() -> dict:
    """Stage outputs pass between assets by reference to the store; training runs through Pipes."""
    # A stopped run gives its process 5 s after SIGINT (which also dies with its parent:
    # trainer.core.entry_point.die_with_parent).
    return {"io_manager": StageStoreIOManager(),
            "pipes_subprocess_client": dg.PipesSubprocessClient(termination_timeout_seconds=5)}


def run_assets(exp: Experiment, through: str) -> list:
    """The assets a CLI run of `exp` through `through` ("data", "base", "model", "round") selects
    from. A data group's packed shards have only data assets upstream and a GGUF base's conversion
    has no upstream, so those two build just theirs; a model or a round needs the experiment's graph."""
    if through == "data":
        return build_data_assets(exp)
    if through == "base":
        return [build_base_model_asset(exp)]
    return list(build_definitions([exp]).assets)


@dg.definitions
def defs() -> dg.Definitions:
    # Lazy: built when Dagster loads the code location, not whenever this module is imported (a
    # `sftdag` command runs one experiment; a broken YAML elsewhere in experiments/ must not stop it).
    return build_definitions(load_experiments())
