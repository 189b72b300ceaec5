"""Identities made of the bytes a stage reads, never of a path, a name or a folder's text.

- `directory_identity(path)`: a model, tokenizer or adapter directory (or one file) by the sha256
  of every regular file in it. Digests are remembered per (path, size, mtime_ns, inode) in
  `$SFTDAG_CACHE/digests/` (default `~/.cache/sftdag/digests`), so a second look costs stats only.
- `code_identity(fn)`: a user's function (a loop verifier, a scorer) by its module's source file
  and those of every module it imports, transitively, that is not the standard library's or an
  installed distribution's: editing a helper the verifier imports changes the identity.
- `hub_commit(repo_id, revision)`: the commit a hub revision ("main", a tag) points to now.

Nothing here imports dagster, torch or transformers (huggingface_hub only inside `hub_commit`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import os
import re
import site
import sys
import sysconfig
import tempfile
import textwrap
import time
import types
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

from trainer.core.store import file_digest

CACHE_ENV = "SFTDAG_CACHE"  # the same base folder as trainer.core.object_store's caches
# A file modified this recently may be modified again within the same mtime tick with the same
# size (git's "racily clean" case): its digest is not remembered.
_RACY_NS = 2_000_000_000
_SHA = re.compile(r"[0-9a-f]{40}")


class IdentityError(ValueError):
    """An identity could not be determined: the message is one line."""


# --- directories ---------------------------------------------------------------------------------


def skip_work_files(rel: str) -> bool:
    """An `exclude` for a training output: its `.tmp-*` work files and `checkpoint-*` folders,
    which are not the result a later stage reads."""
    return any(p.startswith(".tmp-") or fnmatch(p, "checkpoint-*") for p in rel.split("/"))


def _digest_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sftdag").expanduser() / "digests"


def _walk(root: Path, exclude: Callable[[str], bool] | None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under `root`, following symbolic links
    (a hub snapshot's files are links to blobs) but entering no directory twice."""
    found: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()
    def fail(e: OSError) -> None:
        raise e  # os.walk skips an unreadable folder silently: its files would drop out unnoticed

    for here, dirs, files in os.walk(root, onerror=fail, followlinks=True):
        st = os.stat(here)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # a link back to a directory already walked
            continue
        seen.add((st.st_dev, st.st_ino))
        rel_here = Path(here).relative_to(root).as_posix()
        prefix = "" if rel_here == "." else rel_here + "/"
        if exclude is not None:
            dirs[:] = [d for d in dirs if not exclude(prefix + d)]
        dirs.sort()
        for name in files:
            rel = prefix + name
            path = Path(here) / name
            if (exclude is None or not exclude(rel)) and path.is_file():  # a dangling link holds no bytes
                found.append((rel, path))
    return found


def directory_manifest(path: str | Path, exclude: Callable[[str], bool] | None = None, *,
                       cache_dir: str | Path | None = None) -> list[list[str]]:
    """[[relative posix path, sha256 hex], …] of every regular file under `path`, sorted by path.
    `exclude(relative path)` → True skips that file or folder. A single file is `[["", sha256]]`:
    its name is not part of it."""
    root = Path(path).absolute()
    if root.is_file():
        files = [("", root)]
    elif root.is_dir():
        files = _walk(root, exclude)
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    # One memo file per walked root: entries of files no longer there drop out when it is rewritten.
    memo = Path(cache_dir or _digest_cache_dir()) / (hashlib.sha256(str(root).encode()).hexdigest()[:20] + ".json")
    try:
        remembered = json.loads(memo.read_text())
    except (OSError, ValueError):
        remembered = {}
    entries: dict[str, Any] = {}
    manifest = []
    now = time.time_ns()
    for rel, file in sorted(files):
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        key = str(file)
        old = remembered.get(key) if isinstance(remembered, dict) else None
        if isinstance(old, dict) and old.get("stamp") == stamp:
            digest = old["sha256"]
        else:
            digest = file_digest(file)
        if now - st.st_mtime_ns > _RACY_NS:
            entries[key] = {"stamp": stamp, "sha256": digest}
        manifest.append([rel, digest])
    if entries != remembered:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{memo.name}.", suffix=".tmp", dir=memo.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, sort_keys=True)
            os.replace(tmp, memo)  # a reader sees the old memo or the new one, never half of one
        except OSError:
            pass  # a read-only cache only costs the hashing next time
    return manifest


def directory_identity(path: str | Path, exclude: Callable[[str], bool] | None = None, *,
                       cache_dir: str | Path | None = None) -> str:
    """A short hash of `directory_manifest(path, exclude)`: equal for a copy anywhere else."""
    manifest = directory_manifest(path, exclude, cache_dir=cache_dir)
    return hashlib.sha256(json.dumps(manifest, separators=(",", ":")).encode()).hexdigest()[:20]


# --- code ----------------------------------------------------------------------------------------


def _installed_dirs() -> list[str]:
    """Folders of the standard library and of installed distributions, here and in the base
    interpreter (a virtual environment's own site-packages and its interpreter's stdlib)."""
    dirs = set(getattr(site, "getsitepackages", list)()) | {site.getusersitepackages()}  # old virtualenvs lack it
    for base in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        paths = sysconfig.get_paths(vars={"base": base, "platbase": base, "installed_base": base,
                                          "installed_platbase": base})
        dirs |= {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return sorted(os.path.realpath(d) + os.sep for d in dirs if d)


def _not_users(origin: str, installed: list[str]) -> bool:
    """Whether the file is the standard library's or an installed distribution's (judged by where
    it lies, not by its name: a user's module may share a stdlib module's name)."""
    real = os.path.realpath(origin)
    parts = Path(real).parts
    return "site-packages" in parts or "dist-packages" in parts or any(real.startswith(d) for d in installed)


def _imports(source: str, package: str) -> list[tuple[str, list[str]]]:
    """(module imported, [names taken from it]) of every import statement in `source`, at any
    depth (imports inside functions too), relative ones resolved against `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                if node.level > len(parts):
                    continue  # beyond the top-level package: Python raises at import, nothing to read
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, [alias.name for alias in node.names if alias.name != "*"]))
    return found


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except Exception:  # a parent package that fails to import, a __main__ without a spec, …
        return None


def _stable(const: Any) -> str:
    # A frozenset's repr follows string hashes, which differ per process (PYTHONHASHSEED).
    if isinstance(const, frozenset):
        return "frozenset(" + repr(sorted(_stable(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ",".join(_stable(c) for c in const) + ")"
    return repr(const)


def _code_parts(code: types.CodeType) -> list[types.CodeType]:
    """A code object and those of the functions, classes and comprehensions nested in it."""
    nested = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return [code] + [part for c in nested for part in _code_parts(c)]


def _code_digest(code: types.CodeType) -> str:
    """Bytecode, names and constants, no file name or line numbers (places, not behaviour)."""
    h = hashlib.sha256()
    for c in _code_parts(code):
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        h.update(_stable(tuple(k for k in c.co_consts if not isinstance(k, types.CodeType))).encode())
    return h.hexdigest()


def code_identity(obj: Any) -> dict[str, str]:
    """{module name: sha256 of its source file} of the module defining `obj` (a function, class or
    module), and of its parent packages and every module it imports transitively that is neither
    the standard library's nor an installed distribution's (those are not followed further). A
    module that cannot be found is "missing". An object without a source file (defined in a
    notebook or by `exec`) is keyed `module:qualname` and hashed by its source text, else its
    bytecode; the project modules named by the globals its code uses are followed as well.
    Imports are read from the source text: a module imported by a computed name
    (`importlib.import_module(name)`) is not seen."""
    module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
    name = module.__name__ if module is not None else getattr(obj, "__module__", None) or "__main__"
    installed = _installed_dirs()
    identity: dict[str, str] = {}
    todo: list[tuple[str, list[str]]] = []

    try:
        source_file = inspect.getsourcefile(module) if module is not None else None
    except TypeError:  # a built-in module
        source_file = None
    code = getattr(obj, "__code__", None)
    if code is not None and source_file and not os.path.isfile(code.co_filename):
        source_file = None  # made by exec under an existing module's name: that file is not its source
    if source_file and os.path.isfile(source_file):
        identity[name] = file_digest(source_file)
        spec = getattr(module, "__spec__", None)
        package = module.__package__ or (spec.parent if spec else "")  # a script run as __main__: its -m package
        todo += _imports(Path(source_file).read_text(encoding="utf-8", errors="replace"), package or "")
        todo.append((name.rpartition(".")[0], []))  # importing a.b ran a/__init__.py first
    else:
        label = f"{name}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"
        package = name if hasattr(module, "__path__") else name.rpartition(".")[0]
        try:
            text = inspect.getsource(obj)
            identity[label] = hashlib.sha256(text.encode()).hexdigest()
            todo += _imports(textwrap.dedent(text), package)  # a method's source is indented
        except (OSError, TypeError, SyntaxError):
            identity[label] = _code_digest(code) if code is not None else "unknown"
        # Its module's imports ran elsewhere (another notebook cell): follow the globals it uses.
        scope = getattr(obj, "__globals__", {})
        used = {n for c in _code_parts(code) for n in c.co_names} if code is not None else set()
        for n in sorted(used & scope.keys()):
            value = scope[n]
            other = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(other, str) and other != name:
                todo.append((other, []))

    users = {name: True}  # module → whether it is the user's (recorded, its imports followed)
    # The user's packages: `from pkg import x` may take submodule pkg.x.
    packages = {name} if hasattr(module, "__path__") and source_file else set()

    def visit(mod: str, must_exist: bool = True) -> bool:
        """Whether `mod` is the user's, recording it and queueing its imports the first time."""
        if not mod or mod in users:
            return users.get(mod, False)
        users[mod] = False
        parent = mod.rpartition(".")[0]
        if parent and not visit(parent):
            return False  # a submodule of the stdlib or of an installed package: not imported to find out
        spec = _find_spec(mod)
        if spec is None:
            if must_exist:
                identity[mod] = "missing"
            return False
        origin = spec.origin if spec.has_location else None
        if origin is None:  # a namespace package (no file of its own) or a built-in module
            locations = list(spec.submodule_search_locations or [])
            users[mod] = any(not _not_users(loc, installed) for loc in locations)
            packages.update([mod] if users[mod] else [])
            return users[mod]
        if not os.path.isfile(origin) or _not_users(origin, installed):
            return False
        users[mod] = True
        identity[mod] = file_digest(origin)
        is_package = spec.submodule_search_locations is not None
        packages.update([mod] if is_package else [])
        if origin.endswith(".py"):
            try:
                todo.extend(_imports(Path(origin).read_text(encoding="utf-8", errors="replace"),
                                     mod if is_package else parent))
            except SyntaxError:
                pass  # its digest is recorded; importing it fails anyway
        return True

    while todo:
        target, names = todo.pop()
        if visit(target) and target in packages:
            for n in names:  # `from pkg import x`: the submodule pkg.x if there is one, else an attribute
                visit(f"{target}.{n}", must_exist=False)
    return dict(sorted(identity.items()))


# --- hub revisions -------------------------------------------------------------------------------


def _offline(repo_type: str) -> bool:
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if repo_type == "dataset" else ())
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in names)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def hub_commit(repo_id: str, revision: str | None = None, repo_type: str = "model", *,
               cache_dir: str | Path | None = None) -> str:
    """The 40-hex commit sha `revision` (default "main") of hub repo `repo_id` points to: asked of
    the hub, or offline (HF_HUB_OFFLINE, or the request failed) read from the local HF cache's
    `refs/<revision>`. A commit sha is returned as it is. Raises IdentityError (one line)."""
    revision = revision or "main"
    if _SHA.fullmatch(revision):
        return revision
    where = f"{repo_type} {repo_id}@{revision}"
    if ".." in Path(revision).parts:
        raise IdentityError(f"{where}: revision {revision!r} is not a branch, tag or commit")
    reason = "offline (HF_HUB_OFFLINE)"
    if not _offline(repo_type):
        try:
            from huggingface_hub import HfApi

            sha = HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
            if sha and _SHA.fullmatch(sha):
                return sha
            reason = f"the hub returned no commit ({sha!r})"
        except Exception as e:  # no network, a gated repo without a token, …: the cache may know
            reason = f"hub request failed: {_one_line(e)}"
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE  # huggingface_hub's own (HF_HUB_CACHE, HF_HOME)
    ref = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        sha = ref.read_text().strip()
    except OSError:
        raise IdentityError(f"{where}: cannot resolve to a commit: {reason}, and the HF cache has no "
                            f"{ref}") from None
    if not _SHA.fullmatch(sha):
        raise IdentityError(f"{where}: the HF cache's {ref} holds {sha[:60]!r}, not a commit sha")
    return sha
