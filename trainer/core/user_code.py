"""A user's function named in the YAML (`module:function`): a verifier, a scorer."""

from __future__ import annotations

import importlib.util
import pkgutil
from pathlib import Path
from typing import Any


def resolve_function(dotted: str, base_dir: Path) -> Any:
    """An importable module's attribute, else (`module:attr` form) the attribute of the file
    `<base_dir>/<module path>.py`."""
    try:
        return pkgutil.resolve_name(dotted)
    except ModuleNotFoundError:
        module, colon, attr = dotted.partition(":")
        beside = Path(base_dir, *module.split(".")).with_suffix(".py")
        if not colon or not beside.is_file():
            raise
    spec = importlib.util.spec_from_file_location(module, beside)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    obj: Any = loaded
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
