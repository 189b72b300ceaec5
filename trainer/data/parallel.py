"""Building a stage's shards side by side: one process per core (`data.num_proc`), each shard
through `Store.get_or_build` in the process that builds it (its own temporary directory and
rename, so a killed worker leaves nothing that looks complete). Shards already in the store are
not rebuilt: a grown source prepares only its new shards.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from trainer.core.entry_point import die_with_parent
from trainer.core.store import StageOutput, Store

# (key, build(out_dir) -> manifest): a shard to have in the store. A build run by a worker must
# pickle: a partial of a module-level function over plain values.
ShardTask = tuple[str, Callable[[Path], dict[str, Any]]]


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker_init(threads: int, parent_pid: int | None = None) -> None:
    # A killed parent (SIGKILL, the OOM killer) must not leave its workers idle for good: the pool's
    # queues never tell them (each worker holds both ends of their pipes).
    die_with_parent(parent_pid)
    # The Rust tokenizers pool would start a thread per core in every worker: share the cores instead.
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(threads))


# Worker pools by size, kept from stage to stage: starting one costs seconds (a spawned Python
# importing the tokenizers), and every stage of every split would pay it again.
_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    pool = _POOLS.get(workers)
    if pool is None or getattr(pool, "_broken", False):
        # spawn: the parent may hold threads (Dagster, the tokenizers pool) that fork would copy mid-lock.
        threads = max(1, default_num_proc() // workers)
        pool = _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_worker_init, initargs=(threads, os.getpid()))
    return pool


def close_pools(wait: bool = True) -> None:
    """Stop the workers (a stage that runs in this process alone gives their memory back first)."""
    for pool in _POOLS.values():
        pool.shutdown(wait=wait, cancel_futures=True)
    _POOLS.clear()


atexit.register(close_pools, wait=False)


SCRIPT_GUARD = ("shards are built in spawned processes, which import the script that started them: put the "
                "script's work under `if __name__ == \"__main__\":`")


def refuse_in_a_starting_worker() -> None:
    """A spawned worker imports its parent's main script; a script that prepares data at import
    would prepare again in every worker (and wait for the parent's locks for good): stop it."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(SCRIPT_GUARD)


def _build(location: str, stage: str, key: str, build: Callable[[Path], dict[str, Any]]) -> StageOutput:
    return Store(location).get_or_build(stage, key, build)


@dataclass
class ShardBuilder:
    store: Store
    num_proc: int | None = None  # None: the cores
    progress: bool = True

    def build(self, stage: str, tasks: list[ShardTask], what: str) -> list[StageOutput]:
        """The outputs of `tasks`, in order: found in the store, else built (in parallel when more
        than one is missing). The first failure stops the others and is raised as it was."""
        outputs: list[StageOutput | None] = [None] * len(tasks)
        missing = []
        for index, (key, _) in enumerate(tasks):
            if self.store.has(stage, key):
                # publish, not only get: a shard complete in this machine's cache may never have
                # reached the remote store (a kill before its marker), and the index will name it
                outputs[index] = self.store.publish(stage, key)
            else:
                missing.append(index)
        workers = min(self.num_proc or default_num_proc(), len(missing))
        bar = tqdm(total=len(missing), desc=f"{what} ({len(tasks) - len(missing)} of {len(tasks)} shards cached)",
                   unit="shard", disable=not self.progress or not missing)
        with bar:
            if workers <= 1:
                for index in missing:
                    outputs[index] = self.store.get_or_build(stage, *tasks[index])
                    bar.update()
                return outputs  # type: ignore[return-value]
            pool = _pool(workers)
            futures = {pool.submit(_build, self.store.location, stage, *tasks[index]): index for index in missing}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if isinstance(future.exception(), BrokenProcessPool):
                        _POOLS.pop(workers, None)
                        raise RuntimeError(f"a shard worker died ({future.exception()}); if it was started from "
                                           f"a script: {SCRIPT_GUARD}") from future.exception()
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        wait(pending)  # the ones already running finish (or fail) before this returns
                        raise future.exception()
                    outputs[futures[future]] = future.result()
                    bar.update()
        return outputs  # type: ignore[return-value]
