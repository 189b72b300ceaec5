"""Content-addressed store of stage outputs.

A stage output lives at `root/<stage>/<key>/` and is complete iff that directory exists: it is
built in `root/<stage>/.tmp-<key>-<random>/` and renamed into place, so a killed build leaves
only a `.tmp-*` directory that nothing reads. A file lock per key makes a second concurrent
build of the same key wait and then reuse the first one's result instead of building twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from trainer.core.schemas import MERGE_INFO, TRAINING_SUMMARY

# Bump a stage's version whenever its code changes the bytes it writes: the version is part of
# every key, so old outputs are never reused by new code (Axolotl's cache key left code out).
CODE_VERSIONS = {
    "tokenizer": "1",
    "raw": "1",
    "templated": "2",  # 2: turns located by the template's own text; end-of-turn text; tool calls
    "tokenized": "2",  # 2: no word-start marker at piece boundaries (SentencePiece)
    "packed": "2",  # 2: no row without a trainable token (wrapped)
    "adapter": "1",
    "merged": "1",
    "score": "1",
    "samples": "1",
    "accepted": "1",
}

MANIFEST = "manifest.json"
# The file written last into a stage's output, marking it complete: the data stages write their
# manifest; training its summary, merging its merge record (both in their own processes).
COMPLETION_MARKERS = {"adapter": TRAINING_SUMMARY, "merged": MERGE_INFO}


def completion_marker(stage: str) -> str:
    return COMPLETION_MARKERS.get(stage, MANIFEST)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(stage: str, *, inputs: list[str], params: dict[str, Any], code_version: str | None = None) -> str:
    """Key of a stage output: a hash of its inputs' keys, its parameters and its code version."""
    version = CODE_VERSIONS[stage] if code_version is None else code_version
    payload = {"stage": stage, "inputs": list(inputs), "params": params, "code_version": version}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class StageOutput:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]
    cache_hit: bool


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / completion_marker(stage)).is_file()

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        return json.loads((self.path(stage, key) / completion_marker(stage)).read_text())

    def get(self, stage: str, key: str) -> StageOutput:
        return StageOutput(stage, key, self.path(stage, key), self.manifest(stage, key), cache_hit=True)

    def get_or_build(self, stage: str, key: str, build: Callable[[Path], dict[str, Any]]) -> StageOutput:
        """Return the complete output for `key`, building it with `build(tmp_dir) -> manifest` if absent."""
        if self.has(stage, key):
            return self.get(stage, key)
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(stage_dir / f".{key}.lock")):
            if self.has(stage, key):  # built by someone else while we waited
                return self.get(stage, key)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=stage_dir))
            try:
                started = time.time()
                manifest = dict(build(tmp) or {})
                manifest.update(stage=stage, key=key, code_version=CODE_VERSIONS.get(stage),
                                build_seconds=round(time.time() - started, 3), created=time.time())
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
                os.rename(tmp, self.path(stage, key))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return StageOutput(stage, key, self.path(stage, key), manifest, cache_hit=False)
