import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer.core.store import Store, content_key


def test_key_depends_on_inputs_params_and_code_version():
    base = content_key("packed", inputs=["a"], params={"x": 1}, code_version="1")
    assert base == content_key("packed", inputs=["a"], params={"x": 1}, code_version="1")
    assert base != content_key("packed", inputs=["b"], params={"x": 1}, code_version="1")
    assert base != content_key("packed", inputs=["a"], params={"x": 2}, code_version="1")
    assert base != content_key("packed", inputs=["a"], params={"x": 1}, code_version="2")
    assert base != content_key("tokenized", inputs=["a"], params={"x": 1}, code_version="1")


def test_build_once_then_cache_hit(tmp_path):
    store = Store(tmp_path)
    calls = []

    def build(tmp: Path):
        calls.append(tmp)
        (tmp / "rows.txt").write_text("hello")
        return {"counts": {"rows_out": 1}}

    first = store.get_or_build("stage", "k1", build)
    second = store.get_or_build("stage", "k1", build)
    assert len(calls) == 1 and not first.cache_hit and second.cache_hit
    assert (second.path / "rows.txt").read_text() == "hello"
    assert second.manifest["counts"] == {"rows_out": 1} and second.manifest["key"] == "k1"


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    store = Store(tmp_path)

    def build(tmp: Path):
        (tmp / "half.arrow").write_bytes(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        store.get_or_build("stage", "k", build)
    assert not store.has("stage", "k")
    assert not store.path("stage", "k").exists()
    assert list((tmp_path / "stage").glob(".tmp-*")) == []


def test_sigkill_mid_build_leaves_no_complete_output(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from trainer.core.store import Store
        def build(tmp):
            (tmp / "half.arrow").write_bytes(b"partial")
            Path({str(tmp_path / 'started')!r}).write_text("1")
            time.sleep(60)
            return {{}}
        Store({str(tmp_path / 'store')!r}).get_or_build("stage", "k", build)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path / "store")
    assert not store.has("stage", "k") and not store.path("stage", "k").exists()
    # The next build of the same key works and is complete.
    out = store.get_or_build("stage", "k", lambda tmp: (tmp / "ok").write_text("1") and {})
    assert store.has("stage", "k") and (out.path / "ok").exists()


def _concurrent_build(root: str, marker_dir: str) -> str:
    def build(tmp: Path):
        (Path(marker_dir) / f"built-{os.getpid()}").write_text("1")
        time.sleep(0.5)
        (tmp / "data").write_text(str(os.getpid()))
        return {}

    out = Store(root).get_or_build("stage", "same", build)
    return (out.path / "data").read_text()


def test_two_concurrent_builds_of_one_key_build_once(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_concurrent_build, [(str(tmp_path / "s"), str(markers))] * 2)
    assert len(list(markers.iterdir())) == 1
    assert results[0] == results[1]
