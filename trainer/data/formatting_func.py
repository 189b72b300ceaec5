"""Which code a formatting function runs: its identity for the templated key, and a reload of its
module when the file was edited since this process executed it.

A long-lived process (Dagster's, a notebook) keeps the module it imported; a user who edits the
function expects the next preparation to use the edit and to file its rows under a new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import threading
import types

from trainer.core.store import file_digest
from trainer.data.record_formats import load_formatting_func

# Module name → digest of the file its code in this process was executed from (recorded when this
# module first sees it: a module imported elsewhere and edited before that is not noticed).
_LOADED_MODULES: dict[str, str] = {}
_MODULES_LOCK = threading.RLock()
_RELOAD_ATTEMPTS = 3


def _module_name(dotted: str) -> str:
    return dotted.split(":", 1)[0] if ":" in dotted else dotted.rpartition(".")[0]


def _formatting_modules(dotted: str) -> list[types.ModuleType]:
    """The module the formatting function is defined in, then the one the setting names."""
    func = load_formatting_func(dotted)
    named = sys.modules.get(_module_name(dotted))
    modules = [inspect.getmodule(func), named]
    return [m for i, m in enumerate(modules) if m is not None and m not in modules[:i]]


def _module_digest(module: types.ModuleType) -> str:
    file = getattr(module, "__file__", None)
    if file and os.path.isfile(file):
        return file_digest(file)
    try:  # no file of its own (defined interactively): its source as far as it is known
        return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()
    except (OSError, TypeError):
        return module.__name__


def _reload(module: types.ModuleType) -> None:
    file = getattr(module, "__file__", None)
    if file:
        # The bytecode cache is trusted on source mtime and size: an edit within the same second
        # that keeps the size would reload the old code.
        with contextlib.suppress(NotImplementedError, ValueError, OSError):
            os.unlink(importlib.util.cache_from_source(file))
    importlib.reload(module)


def formatting_func_identity(dotted: str | None, *, reload: bool = True) -> str | None:
    """The formatting function's code is part of the key: editing its file must re-template, and
    the key must name the code that runs. A module whose file changed since this process
    executed it is reloaded (reload=False: that is an error instead)."""
    if not dotted:
        return None
    with _MODULES_LOCK:
        for _ in range(_RELOAD_ATTEMPTS):
            modules = _formatting_modules(dotted)
            digests = {m.__name__: _module_digest(m) for m in modules}
            stale = [m for m in modules if _LOADED_MODULES.setdefault(m.__name__, digests[m.__name__])
                     != digests[m.__name__]]
            if not stale:
                payload = json.dumps(sorted(digests.items()))
                return dotted + ":" + hashlib.sha256(payload.encode()).hexdigest()[:16]
            where = getattr(stale[0], "__file__", None) or stale[0].__name__
            if not reload:
                raise RuntimeError(f"formatting_func {dotted!r}: {where} changed while preparing "
                                   "(the key would not name the code that ran); run again")
            if any(m.__name__ == "__main__" or getattr(m, "__spec__", None) is None for m in modules):
                # Re-running a script (or a module without an import spec) is no reload.
                raise RuntimeError(f"formatting_func {dotted!r}: {where} changed since this process started; "
                                   "restart it")
            for m in modules:
                _reload(m)
                _LOADED_MODULES[m.__name__] = digests[m.__name__]
            load_formatting_func.cache_clear()
            # Loop: the files must still be what was digested before the reload.
    raise RuntimeError(f"formatting_func {dotted!r}: its module kept changing while being loaded; "
                       "run again once it is written")


def refresh_formatting_func(dotted: str | None) -> None:
    """Reload the formatting function's module if it was loaded before and its file changed."""
    if not dotted:
        return
    module_name = _module_name(dotted)
    with _MODULES_LOCK:
        tracked = module_name in _LOADED_MODULES and module_name in sys.modules
    if tracked:
        formatting_func_identity(dotted)
