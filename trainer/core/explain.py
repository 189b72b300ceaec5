"""Why two keys of one stage differ: their key records (`Store.key_record`) compared.

A key is a hash of the stage's inputs' keys, its parameters and its code version, and the store
keeps what each key was made of (`<stage>/.keys/<key>.json`). Comparing two records names what
changed: an input (whose own records then say why), a parameter (by its path in the
parameters, with the old and new values), or the code.
"""

from __future__ import annotations

import json
from typing import Any

# Values longer than this are shortened in a change's line.
SHOWN = 60


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= SHOWN else text[:SHOWN - 1] + "…"


def value_changes(old: Any, new: Any, path: str) -> list[str]:
    """`path: old → new` for each leaf that differs (dicts by key, lists by position)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for name in sorted(set(old) | set(new), key=str):
            if name not in old:
                out.append(f"{path}.{name}: added {_shown(new[name])}")
            elif name not in new:
                out.append(f"{path}.{name}: removed (was {_shown(old[name])})")
            else:
                out += value_changes(old[name], new[name], f"{path}.{name}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = [] if len(old) == len(new) else [f"{path}: {len(old)} → {len(new)} items"]
        for i, (a, b) in enumerate(zip(old, new)):
            out += value_changes(a, b, f"{path}[{i}]")
        return out + [f"{path}[{i}]: added {_shown(v)}" for i, v in enumerate(new[len(old):], len(old))]
    return [] if old == new else [f"{path}: {_shown(old)} → {_shown(new)}"]


def record_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(lines saying what changed between two records of one stage, the names of the inputs that changed)."""
    lines, inputs = [], []
    if old.get("code_version") != new.get("code_version"):
        lines.append(f"code version {old.get('code_version')} → {new.get('code_version')} (the stage's code changed)")
    for name in list(new["inputs"]) + [n for n in old["inputs"] if n not in new["inputs"]]:
        before, after = old["inputs"].get(name), new["inputs"].get(name)
        if before != after:
            inputs.append(name)
            lines.append(f"input {name}: {(before or 'none')[:12]} → {(after or 'none')[:12]}")
    lines += value_changes(old["params"], new["params"], "params")
    return lines, inputs
