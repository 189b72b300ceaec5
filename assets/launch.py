"""Launching a process step from an asset: through Dagster Pipes, when its outputs are not in the store."""

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not exported by dagster

from trainer.core.entry_point import failure_file
from trainer.core.process_step import ProcessStep


def run_step(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient,
             step: ProcessStep, what: str) -> bool:
    """Run `step` (its process's log and messages through Pipes) unless the store already has every
    output it leaves; returns whether it did (a cache hit). A process that exits without leaving
    them fails the asset: `<what> exited without completing <the first missing directory>`."""
    if step.complete:
        context.log.info(f"{what}: {step.stage} {step.key} already complete at {step.output_dir}: not run again")
        return True
    command = step.command()
    context.log.info("launching: " + " ".join(command))
    failed = failure_file(step.spec_path)
    failed.unlink(missing_ok=True)
    try:
        pipes_subprocess_client.run(command=command, context=context)
    except DagsterPipesExecutionError:
        if failed.is_file():  # the process's own reason, not Pipes' "failed with code 1"
            raise dg.Failure(f"{what} failed: {failed.read_text().strip()}") from None
        raise
    missing = step.missing()
    if missing:
        raise dg.Failure(f"{what} exited without completing {missing[0]}")
    return False
