"""A stage output built in a process of its own: `python -m <module> SPEC.json`.

The orchestrator never loads a model: training, merging and scoring, sampling and GGUF conversion
run in their own processes (through Dagster Pipes when an asset starts them). Each is one
`ProcessStep`: the store output(s) it must leave, the spec it reads (a dataclass, written as JSON
to `<store root>/<stage>/.specs/<key>.json` when planned) and the command that starts it.

    step = plan_samples(...)          # a ProcessStep, its spec file written
    if not step.complete:
        subprocess.run(step.command())  # or through Pipes: assets.launch.run_step
    out = step.output()               # published to the store's remote copy when it has one

Specs pass between the two sides as JSON (`spec_to_json` / `spec_from_json`), read back into the
same dataclass by its type hints, so a field added on one side is a field the other side knows.
Nothing here imports dagster, torch or a third-party package: a process that only reads its spec
imports this module alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

if TYPE_CHECKING:
    from trainer.core.store import StageOutput, Store

SPECS = ".specs"  # beside a stage's outputs: the specs of the processes that build them

T = TypeVar("T")


class SpecError(ValueError):
    """A spec a process cannot use: the message is one line."""


@dataclass
class ProcessStep:
    """One process and the store outputs it leaves: its own `(stage, key)`, plus `also` (a merge
    also leaves its score)."""

    stage: str
    key: str
    store: Store
    spec: Any  # a dataclass; its JSON is the process's one argument
    module: str  # run as `python -m <module> SPEC.json`
    also: tuple[tuple[str, str], ...] = ()  # more (stage, key) outputs the process must leave
    spec_name: str | None = None  # the spec file's name when it varies under one key (default: the key)

    @property
    def output_dir(self) -> Path:
        return self.store.path(self.stage, self.key)

    @property
    def spec_path(self) -> Path:
        return self.store.root / self.stage / SPECS / f"{self.spec_name or self.key}.json"

    @property
    def outputs(self) -> list[tuple[str, str]]:
        return [(self.stage, self.key), *self.also]

    def missing(self) -> list[Path]:
        """The directories of the outputs the store does not have complete (here or remotely)."""
        return [self.store.path(stage, key) for stage, key in self.outputs if not self.store.has(stage, key)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, str(self.spec_path)]

    def write_spec(self) -> "ProcessStep":
        """Write the spec file (planning does, before anything is launched); returns the step."""
        write_spec_file(self.spec_path, self.spec)
        return self

    def output(self) -> StageOutput:
        """The step's own output, complete, every output published to the store's remote copy when
        it has one (a second publisher would upload the same bytes, so it does not)."""
        for stage, key in self.also:
            self.store.publish(stage, key)
        return self.store.publish(self.stage, self.key)


# --- specs as JSON -------------------------------------------------------------------------------


class JsonSpec:
    """A spec dataclass read back from its JSON: `Spec.load(path | dict | Spec)`."""

    @classmethod
    def load(cls: type[T], source: "str | os.PathLike | dict | T") -> T:
        return load_spec(cls, source)


def load_spec(cls: type[T], source: "str | os.PathLike | dict | T") -> T:
    """`cls` from a spec file, its dict, or an instance (returned as it is)."""
    if isinstance(source, cls):
        return source
    if isinstance(source, dict):
        return spec_from_json(cls, source)
    path = Path(source)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except ValueError as e:
        raise SpecError(f"{path}: not JSON: {e}") from None
    return spec_from_json(cls, raw)


def write_spec_file(path: Path, spec: Any) -> Path:
    """Atomically (a process of a concurrent materialization may be reading it), and only when
    its content changed: planning again leaves an unchanged spec untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(spec_to_json(spec), indent=2)
    if path.is_file() and path.read_text() == text:
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _experiment_class() -> type | None:
    # An Experiment exists only where trainer.core.config was imported: no import needed to tell.
    config = sys.modules.get("trainer.core.config")
    return getattr(config, "Experiment", None)


def _encode(value: Any) -> Any:
    experiment = _experiment_class()
    if experiment is not None and isinstance(value, experiment):
        # Relative paths in it resolve against its YAML's folder: that travels with it.
        return {**value.to_dict(), "base_dir": value.base_dir}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return spec_to_json(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def spec_to_json(obj: Any) -> dict[str, Any]:
    """A spec dataclass as JSON data: paths as text, nested dataclasses as mappings, an Experiment
    as its settings with the folder its relative paths resolve against (`base_dir`)."""
    return {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)


def _is_path(hint: Any) -> bool:
    return hint is Path or (_optional(hint) and Path in typing.get_args(hint))


def _is_experiment(hint: Any) -> bool:
    return isinstance(hint, type) and hint.__name__ == "Experiment" and hint.__module__ == "trainer.core.config"


def spec_from_json(cls: type[T], data: Any, where: str = "spec") -> T:
    """`cls` (a dataclass) from `spec_to_json`'s data, each field converted by its type hint. A
    field without a default is required (an Optional one may be left out: None)."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; {cls.__name__} has {[f.name for f in fields]}")
    kwargs = {}
    for f in fields:
        hint, value = hints[f.name], data.get(f.name)
        if value is None or (value == "" and _is_path(hint)):  # an empty path is no path, not "."
            if _optional(hint):
                kwargs[f.name] = None
            elif not _has_default(f):
                raise SpecError(f"{where}: {f.name!r} is required")
            continue
        kwargs[f.name] = _decode(hint, value, f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the dataclass's own checks (`__post_init__`)
        raise SpecError(f"{where}: {' '.join(str(e).split())}") from None


def _decode(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or origin is Literal:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in args if a is not type(None)]
        return _decode(options[0], value, where) if len(options) == 1 else value
    if _is_experiment(hint):
        from trainer.core.config import experiment_from_dict

        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        settings = dict(value)
        return experiment_from_dict(settings, base_dir=settings.pop("base_dir", "."))
    if dataclasses.is_dataclass(hint):
        return spec_from_json(hint, value, where)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if tuple in (origin, hint) else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_hint, item = (args if len(args) == 2 else (Any, Any))
        return {(str(k) if key_hint is str else k): _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise SpecError(f"{where}: expected a path, got {type(value).__name__}")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float, str):
        if isinstance(value, (dict, list, bool)) and hint is not str:
            raise SpecError(f"{where}: expected {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise SpecError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    return value
