"""trainer.core.identity: identities made of bytes, on real files in tmp_path (no mocks)."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from trainer.core import identity
from trainer.core.identity import (IdentityError, code_identity, directory_identity, directory_manifest,
                                   hub_commit, skip_work_files)

HOUR_AGO = time.time() - 3600


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """The digest memo lives in this test's folder, never in the user's cache."""
    monkeypatch.setenv("SFTDAG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "digests"


def _model_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden": 8}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(200)))
    return root


def _age(root: Path) -> None:
    """Older than the racy window, so that digests are remembered."""
    for p in [root, *root.rglob("*")]:
        os.utime(p, (HOUR_AGO, HOUR_AGO))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_manifest_lists_every_file_by_relative_path(tmp_path):
    root = _model_dir(tmp_path / "model")
    assert directory_manifest(root) == [["config.json", _sha(b'{"hidden": 8}')],
                                        ["sub/weights.bin", _sha(bytes(range(200)))]]
    assert len(directory_identity(root)) == 20


@pytest.mark.parametrize("rel", ["config.json", "sub/weights.bin"])
def test_identity_changes_with_any_byte(tmp_path, rel):
    root = _model_dir(tmp_path / "model")
    _age(root)
    before = directory_identity(root)  # remembered: the edit below must still be seen
    data = bytearray((root / rel).read_bytes())
    data[3] ^= 1  # same size, one bit
    (root / rel).write_bytes(bytes(data))
    assert directory_identity(root) != before


def test_identity_changes_when_a_file_is_added(tmp_path):
    root = _model_dir(tmp_path / "model")
    before = directory_identity(root)
    (root / "sub" / "extra.txt").write_text("")
    assert directory_identity(root) != before


def test_identity_does_not_depend_on_the_folder_name_or_place(tmp_path):
    root = _model_dir(tmp_path / "model")
    before = directory_identity(root)
    copy = tmp_path / "elsewhere" / "deeper" / "another-name"
    shutil.copytree(root, copy)
    assert directory_identity(copy) == before
    moved = tmp_path / "renamed"
    root.rename(moved)
    assert directory_identity(moved) == before


def test_a_single_file_is_identified_by_its_bytes_not_its_name(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"weights")
    (tmp_path / "b.bin").write_bytes(b"weights")
    assert directory_manifest(tmp_path / "a.gguf") == [["", _sha(b"weights")]]
    assert directory_identity(tmp_path / "a.gguf") == directory_identity(tmp_path / "b.bin")


def test_linked_files_are_read_through(tmp_path):
    """A hub snapshot's files are links to blobs: the blob's bytes count."""
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"tensor bytes")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(blob)
    (snap / "loop").symlink_to(snap)  # a link back up: walked once
    assert directory_manifest(snap) == [["model.safetensors", _sha(b"tensor bytes")]]


def test_exclude_skips_work_files_only_when_asked(tmp_path):
    root = _model_dir(tmp_path / "adapter")
    plain = directory_identity(root)
    (root / "checkpoint-500").mkdir()
    (root / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    (root / ".tmp-upload-1").write_bytes(b"half")
    assert [rel for rel, _ in directory_manifest(root)] == [
        ".tmp-upload-1", "checkpoint-500/optimizer.pt", "config.json", "sub/weights.bin"]
    assert directory_identity(root, exclude=skip_work_files) == plain


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        directory_manifest(tmp_path / "nope")


def test_digests_are_remembered(tmp_path, monkeypatch, digest_cache):
    root = _model_dir(tmp_path / "model")
    _age(root)
    hashed = []
    real = identity.file_digest
    monkeypatch.setattr(identity, "file_digest", lambda p: hashed.append(Path(p).name) or real(p))
    first = directory_manifest(root)
    assert sorted(hashed) == ["config.json", "weights.bin"]
    assert len(list(digest_cache.glob("*.json"))) == 1  # written whole (tmp, then replace)
    assert not list(digest_cache.glob(".*.tmp"))
    hashed.clear()
    assert directory_manifest(root) == first
    assert hashed == []  # stats only
    (root / "config.json").write_text('{"hidden": 9}')
    directory_manifest(root)
    assert hashed == ["config.json"]


def test_a_just_written_file_is_not_remembered(tmp_path, monkeypatch):
    """Rewritten within the same mtime tick with the same size, it would look unchanged."""
    root = _model_dir(tmp_path / "model")
    hashed = []
    real = identity.file_digest
    monkeypatch.setattr(identity, "file_digest", lambda p: hashed.append(Path(p).name) or real(p))
    directory_manifest(root)
    directory_manifest(root)
    assert len(hashed) == 4


# --- code ----------------------------------------------------------------------------------------

VERIFIER = """
import json
import numpy
import xml.dom.minidom
from numpy import linalg
import helper2
from . import helper
from nspkg import nsmod  # a namespace package: no __init__.py
from trainer.core import store

def verify(sample, text):
    from .deep import inner  # only imported when called
    try:
        import not_a_module_anywhere
    except ImportError:
        pass
    return helper.ok(text) and helper2.ok(text)
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project beside their YAML: package `vpkg` and top-level module `helper2`."""
    root = tmp_path / "proj"
    pkg = root / "vpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "checks.py").write_text(VERIFIER)
    (pkg / "helper.py").write_text("from . import checks  # a cycle\n\ndef ok(text):\n    return True\n")
    (pkg / "deep.py").write_text("from .helper import ok\ninner = 1\n")
    (pkg / "unrelated.py").write_text("x = 1\n")
    (root / "helper2.py").write_text("import vpkg.helper\n\ndef ok(text):\n    return True\n")
    (root / "nspkg").mkdir()
    (root / "nspkg" / "nsmod.py").write_text("z = 1\n")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m == "helper2" or m.split(".")[0] in ("vpkg", "nspkg")]:
        del sys.modules[name]


def _verify():
    return importlib.import_module("vpkg.checks").verify


def test_code_identity_lists_the_users_modules_only(project):
    ids = code_identity(_verify())
    assert list(ids) == sorted(ids)
    user = {"helper2", "nspkg.nsmod", "vpkg", "vpkg.checks", "vpkg.deep", "vpkg.helper"}
    project_own = {"trainer", "trainer.core", "trainer.core.store", "trainer.core.object_store",
                   "trainer.core.schemas"}
    assert user | project_own <= set(ids)
    assert ids["vpkg.helper"] == _sha((project / "vpkg" / "helper.py").read_bytes())
    assert ids["not_a_module_anywhere"] == "missing"
    assert all(name.split(".")[0] in {"vpkg", "nspkg", "helper2", "trainer", "not_a_module_anywhere"}
               for name in ids)  # no json, xml, numpy, numpy.linalg, nor store's filelock and fsspec
    assert code_identity(_verify()) == ids


@pytest.mark.parametrize("edited", ["vpkg/helper.py", "helper2.py", "vpkg/deep.py", "vpkg/__init__.py",
                                    "nspkg/nsmod.py"])
def test_editing_an_imported_module_changes_the_identity(project, edited):
    before = code_identity(_verify())
    with open(project / edited, "a") as f:
        f.write("# edited\n")
    assert code_identity(_verify()) != before


def test_editing_an_unrelated_module_does_not(project):
    before = code_identity(_verify())
    (project / "vpkg" / "unrelated.py").write_text("x = 2\n")
    (project / "other.py").write_text("y = 1\n")
    assert code_identity(_verify()) == before


def test_a_module_is_identified_like_its_functions(project):
    assert code_identity(importlib.import_module("vpkg.checks")) == code_identity(_verify())


def test_a_function_without_a_source_file(project):
    """Made by exec (as in a notebook): its bytecode, and the project modules its globals name."""
    scope = {"__name__": "notebook_cell"}
    exec("import vpkg.helper as h\n\ndef f(text):\n    return h.ok(text)\n", scope)
    ids = code_identity(scope["f"])
    assert ids["notebook_cell:f"] not in ("unknown", "missing")
    assert "vpkg.helper" in ids and "vpkg.checks" in ids  # followed from helper
    scope2 = {"__name__": "notebook_cell"}
    exec("import vpkg.helper as h\n\ndef f(text):\n    return not h.ok(text)\n", scope2)
    assert code_identity(scope2["f"])["notebook_cell:f"] != ids["notebook_cell:f"]


# --- hub revisions -------------------------------------------------------------------------------

SHA_MAIN = "0123456789abcdef0123456789abcdef01234567"
SHA_TAG = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A local HF hub cache with huggingface_hub's layout, and no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf"
    refs = cache / "models--org--tiny-model" / "refs"
    (refs / "refs" / "pr").mkdir(parents=True)
    (refs / "main").write_text(SHA_MAIN)  # huggingface_hub writes no newline; tolerate one anyway
    (refs / "v1.0").write_text(SHA_TAG + "\n")
    (refs / "refs" / "pr" / "1").write_text(SHA_TAG)
    (cache / "models--org--tiny-model" / "snapshots" / SHA_MAIN).mkdir(parents=True)
    (cache / "datasets--org--data" / "refs").mkdir(parents=True)
    (cache / "datasets--org--data" / "refs" / "main").write_text(SHA_TAG)
    return cache


def test_hub_commit_from_the_local_cache(hf_cache):
    assert hub_commit("org/tiny-model", "main", cache_dir=hf_cache) == SHA_MAIN
    assert hub_commit("org/tiny-model", None, cache_dir=hf_cache) == SHA_MAIN
    assert hub_commit("org/tiny-model", "v1.0", cache_dir=hf_cache) == SHA_TAG
    assert hub_commit("org/tiny-model", "refs/pr/1", cache_dir=hf_cache) == SHA_TAG
    assert hub_commit("org/data", "main", "dataset", cache_dir=hf_cache) == SHA_TAG


def test_a_commit_sha_is_returned_as_is(hf_cache):
    sha = "a" * 40
    assert hub_commit("org/not-cached", sha, cache_dir=hf_cache) == sha


@pytest.mark.parametrize("repo_id, revision, repo_type", [
    ("org/absent", "main", "model"),
    ("org/tiny-model", "no-such-branch", "model"),
    ("org/tiny-model", "main", "dataset"),
    ("org/tiny-model", "../../datasets--org--data/refs/main", "model"),
])
def test_unresolvable_revisions_raise_one_line(hf_cache, repo_id, revision, repo_type):
    with pytest.raises(IdentityError) as info:
        hub_commit(repo_id, revision, repo_type, cache_dir=hf_cache)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and repo_id in message


def test_a_damaged_ref_is_an_error(hf_cache):
    (hf_cache / "models--org--tiny-model" / "refs" / "main").write_text("not a sha")
    with pytest.raises(IdentityError, match="not a commit sha"):
        hub_commit("org/tiny-model", cache_dir=hf_cache)
