"""Content-addressed store of stage outputs.

A stage output lives at `root/<stage>/<key>/` and is complete iff its completion marker is there:
it is built in `root/<stage>/.tmp-<key>-<random>/` and renamed into place, so a killed build leaves
only a `.tmp-*` directory that nothing reads. Its files and directories are fsynced before the
rename (and the parent after), so a power loss cannot leave a marker that names lost data; a
marker that is unreadable anyway (cut short) means "not built", and the next build replaces it.
A file lock per key makes a second concurrent
build of the same key wait and then reuse the first one's result instead of building twice.

A store on object storage (`Store("s3://bucket/prefix")`) has `root` = its local cache: stages
are built there and then published (marker last, `trainer.core.object_store`), and a stage found
only remotely is downloaded there once; every reader gets a local `path` either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from trainer.core.object_store import ObjectStore, cache_dir, cached_url, is_remote
from trainer.core.graph import MANIFEST, STAGES, completion_marker

# Each stage's code version is part of every key, so old outputs are never reused by new code
# (Axolotl's cache key left code out); the versions and the file marking each stage's output
# complete are declared once, in trainer.core.graph.
KEY_RECORDS = ".keys"  # beside a stage's outputs: what each key is made of

CODE_VERSIONS = {name: stage.code_version for name, stage in STAGES.items()}


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
    """Stage outputs under `location`: a local directory, or an object-storage URL (then `root` is
    its local cache; opening that cache directory opens the remote store again)."""

    def __init__(self, location: str | Path):
        self.root = cache_dir(str(location)) if is_remote(location) else Path(location)
        url = cached_url(self.root)
        self.remote = ObjectStore(url) if url else None

    @property
    def location(self) -> str:
        """The URL of a store on object storage, else its directory."""
        return self.remote.url if self.remote else str(self.root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def _marker(self, stage: str, key: str) -> dict[str, Any] | None:
        """The completion marker's content; None when it is absent or unreadable (a write cut short
        by a crash or power loss: then the output is not complete)."""
        try:
            marker = json.loads((self.path(stage, key) / completion_marker(stage)).read_text())
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        return marker if isinstance(marker, dict) else None

    def _local(self, stage: str, key: str) -> bool:
        return self._marker(stage, key) is not None

    def _lock(self, stage: str, key: str) -> FileLock:
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(stage_dir / f".{key}.lock"))

    def has(self, stage: str, key: str) -> bool:
        if self._local(stage, key):
            return True
        return self.remote is not None and self.remote.has(stage, key, completion_marker(stage))

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        marker = self._marker(stage, key)
        if marker is None:
            raise FileNotFoundError(f"{stage}/{key} is not complete in {self.root}: no readable "
                                    f"{completion_marker(stage)}")
        return marker

    def get(self, stage: str, key: str) -> StageOutput:
        """The complete output of `key`; from a remote store, downloaded into the cache first (once)."""
        if self.remote is not None and not self._local(stage, key):
            with self._lock(stage, key):
                if not self._local(stage, key):
                    self._download(stage, key)
        return StageOutput(stage, key, self.path(stage, key), self.manifest(stage, key), cache_hit=True)

    def _download(self, stage: str, key: str) -> None:
        """Download `key` into place (caller holds the key's lock)."""
        marker = completion_marker(stage)
        if not self.remote.has(stage, key, marker):
            raise FileNotFoundError(f"{stage}/{key} is not in {self.remote.url}: no {marker} there "
                                    "(never published, or its upload did not finish)")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root / stage))
        try:
            self.remote.download(stage, key, tmp)
            _sync_tree(tmp)
            # An adapter or merged model is written in place by its process: a crashed one leaves
            # an incomplete directory, which the complete copy replaces.
            _discard(self.path(stage, key))
            os.rename(tmp, self.path(stage, key))
            _fsync_dir(self.root / stage)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def publish(self, stage: str, key: str) -> StageOutput:
        """The complete output of `key` (written into `path(stage, key)` here, or downloaded),
        uploaded to a remote store unless it is there already: a second publisher would upload
        the same bytes."""
        output = self.get(stage, key)
        marker = completion_marker(stage)
        if self.remote is not None and not self.remote.has(stage, key, marker):
            self.remote.upload(stage, key, self.path(stage, key), marker)
        return output

    def key(self, stage: str, inputs: dict[str, str], params: dict[str, Any], code_version: str | None = None) -> str:
        """`content_key` of a stage from its named inputs' keys (in order) and its parameters, recorded."""
        key = content_key(stage, inputs=list(inputs.values()), params=params, code_version=code_version)
        self.record_key(stage, key, inputs, params, code_version)
        return key

    def record_key(self, stage: str, key: str, inputs: dict[str, str], params: dict[str, Any],
                   code_version: str | None = None) -> None:
        """Keep what `key` is made of (`<stage>/.keys/<key>.json`, once): `sftdag explain` compares two
        keys' records to say which input or parameter changed. A key never changes its meaning, so
        an existing record is left as is."""
        path = self.root / stage / KEY_RECORDS / f"{key}.json"
        if path.is_file() and self.key_record(stage, key) is not None:
            return
        record = {"stage": stage, "key": key, "inputs": inputs, "params": params,
                  "code_version": CODE_VERSIONS.get(stage) if code_version is None else code_version}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{key}-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(_canonical(record))
        os.replace(tmp, path)

    def key_record(self, stage: str, key: str) -> dict[str, Any] | None:
        """What `key` was made of, when this store computed it (None for a key it never saw, or
        whose record was cut short)."""
        try:
            return json.loads((self.root / stage / KEY_RECORDS / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def get_or_build(self, stage: str, key: str, build: Callable[[Path], dict[str, Any]]) -> StageOutput:
        """Return the complete output for `key`, building it with `build(tmp_dir) -> manifest` if
        absent; a remote store gets what this machine built (or built before a failed upload)."""
        built = None
        if not self.has(stage, key):
            with self._lock(stage, key):
                if not self.has(stage, key):  # else built by someone else while we waited
                    built = self._build(stage, key, build)
        published = self.publish(stage, key)
        return built or published

    def _build(self, stage: str, key: str, build: Callable[[Path], dict[str, Any]]) -> StageOutput:
        """Build `key` into place (caller holds the key's lock)."""
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root / stage))
        try:
            started = time.time()
            manifest = dict(build(tmp) or {})
            manifest.update(stage=stage, key=key, code_version=CODE_VERSIONS.get(stage),
                            build_seconds=round(time.time() - started, 3), created=time.time())
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            _sync_tree(tmp)
            _discard(self.path(stage, key))  # an earlier output whose marker is unreadable
            os.rename(tmp, self.path(stage, key))
            _fsync_dir(self.root / stage)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StageOutput(stage, key, self.path(stage, key), manifest, cache_hit=False)


def write_durably(path: Path, text: str) -> None:
    """Write `path` whole or not at all, and on disk before anyone can read it as written (a
    marker or record cut short by a power loss would otherwise read as complete)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (itself included), before it is renamed into
    place: the rename must not reach the disk before what it names."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _discard(path: Path) -> None:
    """Remove an incomplete output directory (caller holds the key's lock): first renamed aside as
    a `.tmp-*` directory, so nothing ever sees it half deleted."""
    if not path.exists():
        return
    aside = path.with_name(f".tmp-{path.name}-discarded-{os.getpid()}-{threading.get_ident()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
