"""A reconstructable job for tests/test_shard_steps.py: the code location's prepare job of the
experiments in $SFTDAG_EXPERIMENTS (the multiprocess executor reloads it in every step's process)."""

import os

from pipelines.definitions import build_definitions
from pipelines.experiments import load_experiments


def prepare_job():
    defs = build_definitions(load_experiments())
    return defs.get_job_def(f"{os.environ['SFTDAG_TEST_GROUP']}_prepare")
