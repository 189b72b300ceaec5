"""The entry point of a process the orchestrator starts (`python -m … SPEC.json`): one spec file
in, its log through Dagster Pipes when launched through it (closed with the exception, if any)."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable


def run_entry_point(argv: list[str] | None, module: str, run: Callable[[Path], str]) -> int:
    """`run(spec_path)` does the work and returns the line to report; 2 on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(f"usage: python -m {module} SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pipes = nullcontext()
    if os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        pipes = open_dagster_pipes()
    with pipes as reporter:
        message = run(Path(argv[0]))
        if reporter is not None:
            reporter.log.info(message)
    return 0
