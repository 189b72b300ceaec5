"""The store's remote copy on object storage (`s3://bucket/prefix`, `gs://…`, `az://…`), through fsspec.

Stage outputs are built and read locally; the remote copy is where machines meet. A stage is
uploaded file by file with its completion marker LAST, so a stage whose marker is absent is
incomplete whatever else was uploaded (a publisher killed mid-upload leaves nothing that looks
complete). Keys name contents, so two publishers of one key upload the same bytes: no locking
across machines. Readers download a stage once into the local cache (`cache_dir`) and read it
there, memory-mapped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


CACHE_ENV = "SFTDAG_CACHE"
# Written into a cache directory: the URL whose cache it is, so a store opened on the directory
# (a stage output's `path.parents[1]`) is that remote store again.
STORE_URL_FILE = ".store_url"


def is_remote(location: str | Path) -> bool:
    """Whether `location` is an object-storage URL rather than a local directory."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme != "file"


def cache_dir(url: str) -> Path:
    """The local cache of the store at `url`: `$SFTDAG_CACHE/<hash of the URL>` (default
    `~/.cache/sftdag`), created with a note of its URL."""
    url = url.rstrip("/")
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sftdag").expanduser()
    root = base / hashlib.sha256(url.encode()).hexdigest()[:16]
    note = root / STORE_URL_FILE
    if not note.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-url-{os.getpid()}"
        with open(tmp, "w") as f:  # synced: an empty note after a power loss would make it a local store
            f.write(url)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, note)
    return root


def cached_url(root: Path) -> str | None:
    """The URL of the store whose cache `root` is, None for a local store."""
    note = root / STORE_URL_FILE
    return note.read_text().strip() if note.is_file() else None


class ObjectStore:
    """Stage outputs under `url` (`<url>/<stage>/<key>/…`)."""

    def __init__(self, url: str):
        import fsspec  # here: a local store (most runs, every cached prepare) never needs it

        self.url = url.rstrip("/")
        # No listings cache: whether a marker exists must be asked of the server each time, since
        # other machines publish meanwhile.
        self.fs, self.base = fsspec.url_to_fs(self.url, use_listings_cache=False)

    def _dir(self, stage: str, key: str) -> str:
        return f"{self.base}/{stage}/{key}"

    def has(self, stage: str, key: str, marker: str) -> bool:
        return self.fs.exists(f"{self._dir(stage, key)}/{marker}")

    def upload(self, stage: str, key: str, local: Path, marker: str) -> None:
        """Upload the complete stage output in `local`: every file, then the marker."""
        remote = self._dir(stage, key)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != marker)
        if files:
            self.fs.put([str(p) for p in files], [f"{remote}/{p.relative_to(local).as_posix()}" for p in files])
        self.fs.put_file(str(local / marker), f"{remote}/{marker}")

    def download(self, stage: str, key: str, local: Path) -> None:
        """Download the stage output (complete: its marker was seen) into the empty directory `local`.
        Every object's name is checked before anything is written: whoever can write the bucket must
        not write files elsewhere on the readers' machines."""
        remote = self._dir(stage, key)
        objects = self.fs.find(remote)
        targets = [local_target(remote, o, local) for o in objects]
        self.fs.get(objects, [str(t) for t in targets])


class UnsafeObjectName(ValueError):
    """An object whose name does not map to a file inside the stage's directory."""


def local_target(remote_dir: str, name: str, local: Path) -> Path:
    """Where object `name` of the stage at `remote_dir` (`<prefix>/<stage>/<key>`) goes under `local`;
    UnsafeObjectName for a name outside that layout (`..`, empty or absolute parts, a backslash)."""
    relative = name[len(remote_dir) + 1:] if name.startswith(remote_dir + "/") else ""
    parts = relative.split("/")
    if not relative or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise UnsafeObjectName(f"object {name!r} is not a file of {remote_dir}/: refusing to download it")
    target = local.joinpath(*parts)
    if not target.resolve().is_relative_to(local.resolve()):  # a symlink already in `local`
        raise UnsafeObjectName(f"object {name!r} would be written outside {local}: refusing to download it")
    return target
