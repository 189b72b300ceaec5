"""A real S3-API server on loopback for tests: moto in server mode, in its own process.

Its access log (one line per HTTP request) is kept, so a test can tell which objects were
downloaded. Clients find it through the standard AWS variables (`environment()`), which
botocore, and so s3fs, read; subprocesses inherit them.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, log: Path):
        self.log = log
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start:\n{log.read_text()}")
                time.sleep(0.1)

    def environment(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def object_downloads(self, bucket: str) -> list[str]:
        """The paths of the objects of `bucket` fetched so far (GETs of an object, not listings)."""
        pattern = re.compile(rf'"GET (/{re.escape(bucket)}/[^ ?]+) HTTP')
        return [m.group(1) for m in map(pattern.search, self.log.read_text().splitlines()) if m]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
