"""`sftdag ui` started as a user starts it, and asked over its GraphQL endpoint on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_ui(experiments: list[str], env: dict[str, str], timeout: float = 180) -> Iterator[Callable[[str], dict]]:
    """Start `sftdag ui EXPERIMENTS` and wait until its code location answers with asset nodes;
    yields `query(graphql) -> data`. The server's process group is stopped on the way out."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", *experiments, "--port", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def query(graphql: str) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"query": graphql}).encode())
        body = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert "errors" not in body, body["errors"]
        return body["data"]

    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, "dagster dev exited"
            assert time.time() < deadline, "the UI did not answer in time"
            try:
                if query("{ assetNodes { id } }")["assetNodes"]:
                    break  # an empty list: the code location is still loading
            except OSError:
                pass
            time.sleep(2)
        yield query
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
