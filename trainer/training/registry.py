"""MLflow model registry: register merged models and move the champion alias only to a better one.

A version's source is the merged model's folder itself (its absolute `file://` URI): MLflow
records the location and copies nothing. Everything the project knows about a version lives in
its tags, so the MLflow UI shows it:

- `sftdag.<key>` — lineage given at registration (`merged_key` required; `adapter_key`,
  `data_version`, `score.<scorer>`, ...). `sftdag.merged_key` identifies the model: registering
  it again returns the existing version.
- `sftdag.metric`, `sftdag.value`, `sftdag.basis` — the metric measured at registration.
- `sftdag.value.<basis>.<metric>` — every value known for the version, one tag per basis
  (a digest of what was measured: held-out prompts + scorers' code). Values are comparable only
  on the same basis; `promote` adds one when it rescores a champion on a newer basis.
- `sftdag.promotion` — the last decision and its reason: `promoted: <reason>` or `not promoted: <reason>`.

Concurrency: on a `sqlite:///` store (the project's default) register and promote decide under a
file lock beside the database, so processes on one host take turns; on a remote tracking server
MLflow offers no compare-and-set for aliases, so two promotions at the same instant can both read
the old champion and the last write wins (duplicate registrations are still undone).

The filesystem store (`./mlruns`, `file:…`) refuses to open in MLflow 3 unless
MLFLOW_ALLOW_FILE_STORE=true ("The filesystem tracking backend … is in maintenance mode");
use `sqlite:///…/mlflow.db` (see `tracking.default_tracking_uri`) or a tracking server.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

TAG_PREFIX = "sftdag."
MERGED_KEY = "merged_key"
VALUE_PREFIX = f"{TAG_PREFIX}value."
PROMOTION_TAG = f"{TAG_PREFIX}promotion"
BOOKKEEPING = frozenset({"metric", "value", "basis", "promotion"})
BASIS_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    source: str
    run_id: str | None
    metric: str | None          # measured at registration
    value: float | None
    basis: str | None
    lineage: dict[str, str]     # "merged_key", "adapter_key", "score.<scorer>", ... (prefix stripped)
    values: dict[tuple[str, str], float] = field(default_factory=dict)  # (basis, metric) → value
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)  # every tag, as stored

    def value_on(self, metric: str, basis: str) -> float | None:
        return self.values.get((basis, metric))


@dataclass(frozen=True)
class Promotion:
    promoted: bool                  # this call moved the alias to `version`
    version: int
    champion_version: int | None    # the alias holder after the decision
    previous_version: int | None    # the holder before it
    previous_value: float | None    # the holder's value the candidate was compared with
    value: float | None
    reason: str


def register(tracking_uri: str, name: str, model_dir: str | Path, *, metric: str, value: float | None,
             basis: str, lineage: Mapping[str, str], run_id: str | None = None) -> ModelVersionInfo:
    """Register `model_dir` as a new version of `name` (created if missing), or return the version
    already registered with the same `lineage["merged_key"]`."""
    _check_name(name)
    _check_measure(metric, basis)
    value = _finite_or_none(value, metric)
    lineage_tags = _lineage_tags(lineage)
    merged_key = lineage_tags[TAG_PREFIX + MERGED_KEY]
    source = _source_uri(model_dir)
    tags = {**lineage_tags, f"{TAG_PREFIX}metric": metric, f"{TAG_PREFIX}basis": basis}
    if value is not None:
        tags[f"{TAG_PREFIX}value"] = repr(value)
        tags[_value_tag(basis, metric)] = repr(value)

    with _registry_lock(tracking_uri) as locked, _as_value_error(f"registered model {name!r}"):
        client = _client(tracking_uri)
        _get_or_create_registered_model(client, name)
        existing = _versions_with_merged_key(client, name, merged_key)
        if existing:
            return _info(existing[0])
        created = client.create_model_version(name, source, run_id=run_id, tags=tags)
        if locked:
            return _info(created)
        # Without a lock (remote server) two processes may both have created one: keep the first.
        first = _versions_with_merged_key(client, name, merged_key)[0]
        if int(first.version) != int(created.version):
            client.delete_model_version(name, created.version)
        return _info(first)


def promote(tracking_uri: str, name: str, version: int | str, *, metric: str, value: float | None, basis: str,
            higher_is_better: bool = True, min_delta: float = 0.0, alias: str = "champion",
            rescore: Callable[[ModelVersionInfo], float | None] | None = None) -> Promotion:
    """Move `alias` to `version` only if its `metric` on `basis` beats the holder's by more than
    `min_delta` (ties keep the holder). A holder measured on another basis is rescored with
    `rescore(holder)` (recorded on the holder); without one, nothing moves. The decision and
    its reason are tagged on `version`."""
    _check_name(name)
    _check_measure(metric, basis)
    if not isinstance(min_delta, (int, float)) or not min_delta >= 0:
        raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
    value = _finite_or_none(value, metric)
    with _registry_lock(tracking_uri), _as_value_error(f"registered model {name!r}"):
        client = _client(tracking_uri)
        candidate = _info(_model_version(client, name, version))
        number = candidate.version
        if value is not None and candidate.value_on(metric, basis) != value:
            client.set_model_version_tag(name, str(number), _value_tag(basis, metric), repr(value))
        holder = _alias_holder(client, name, alias)
        holder_value, rescored = None, False
        if value is not None and holder is not None and holder.version != number:
            holder_value = holder.value_on(metric, basis)
            if holder_value is None and rescore is not None:
                holder_value = _finite_or_none(rescore(holder), metric)
                rescored = holder_value is not None
                if rescored:
                    client.set_model_version_tag(name, str(holder.version), _value_tag(basis, metric),
                                                 repr(holder_value))
        promoted, reason = _decide(number, value, holder, holder_value, metric=metric, basis=basis,
                                   higher_is_better=higher_is_better, min_delta=min_delta, alias=alias,
                                   rescore_given=rescore is not None, rescored=rescored)
        if promoted:
            client.set_registered_model_alias(name, alias, str(number))
        client.set_model_version_tag(name, str(number), PROMOTION_TAG,
                                     f"{'promoted' if promoted else 'not promoted'}: {reason}")
        after = _alias_holder(client, name, alias)
        return Promotion(promoted=promoted, version=number, champion_version=after.version if after else None,
                         previous_version=holder.version if holder else None, previous_value=holder_value,
                         value=value, reason=reason)


def champion(tracking_uri: str, name: str, alias: str = "champion") -> ModelVersionInfo | None:
    """The version `alias` points at (None when the model or the alias does not exist yet)."""
    _check_name(name)
    with _registry_lock(tracking_uri), _as_value_error(f"registered model {name!r}"):
        return _alias_holder(_client(tracking_uri), name, alias)


def version_info(tracking_uri: str, name: str, version: int | str) -> ModelVersionInfo:
    """One version with its lineage and every value recorded for it."""
    _check_name(name)
    with _registry_lock(tracking_uri), _as_value_error(f"registered model {name!r}"):
        return _info(_model_version(_client(tracking_uri), name, version))


def _decide(number: int, value: float | None, holder: ModelVersionInfo | None, holder_value: float | None, *,
            metric: str, basis: str, higher_is_better: bool, min_delta: float, alias: str,
            rescore_given: bool, rescored: bool) -> tuple[bool, str]:
    """(move the alias?, the one-line reason)."""
    mine = f"{metric} {_fmt(value)}"
    if value is None:
        kept = f"kept {alias} version {holder.version}" if holder else f"no {alias}"
        return False, f"version {number} has no {metric} value (not scored, or its scorer failed on every row): {kept}"
    if holder is None:
        return True, f"no {alias} yet: version {number} ({mine}) becomes {alias}"
    if holder.version == number:
        return False, f"version {number} ({mine}) already is {alias}"
    kept = f"kept {alias} version {holder.version}"
    if holder_value is None:
        measured = (f"its {metric} was measured on basis {holder.basis}" if holder.basis != basis
                    else f"it has no {metric} value")
        if not rescore_given:
            return False, (f"{kept}: {measured}, version {number}'s ({_fmt(value)}) on basis {basis}, "
                           f"and no rescore was given")
        return False, (f"{kept}: {measured} and rescoring it on basis {basis} gave no value to compare "
                       f"with version {number}'s {_fmt(value)}")
    how = f" rescored on basis {basis}" if rescored else ""
    direction = "" if higher_is_better else " (lower is better)"
    gain = value - holder_value if higher_is_better else holder_value - value
    if gain > min_delta:
        return True, (f"version {number} ({mine}) beats {alias} version {holder.version} "
                      f"({_fmt(holder_value)}{how}) by {_fmt(gain)}{direction}")
    if gain > 0:
        return False, (f"{kept} ({_fmt(holder_value)}{how}): version {number}'s {mine} is better by only "
                       f"{_fmt(gain)}, not more than min_delta {_fmt(min_delta)}{direction}")
    return False, (f"{kept}: version {number}'s {mine} is not better than {_fmt(holder_value)}{how}"
                   f"{direction}")


# --- helpers ---------------------------------------------------------------------------------

def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def _as_value_error(what: str) -> Iterator[None]:
    """MLflow's own validation (names, tag keys, versions) as one line naming what was wrong."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise ValueError(f"{what}: {e.message}") from None
        raise


def _check_name(name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    if not isinstance(name, str):
        raise ValueError(f"registered model name must be a string, got {name!r}")
    try:
        _validate_model_name(name)
    except MlflowException as e:
        raise ValueError(f"registered model name {name!r}: {e.message}") from None


def _check_measure(metric: str, basis: str) -> None:
    if not isinstance(metric, str) or not metric.strip():
        raise ValueError(f"metric: a metric name is required, got {metric!r}")
    if not isinstance(basis, str) or not BASIS_RE.match(basis):
        # Part of a tag key (`sftdag.value.<basis>.<metric>`), parsed back at the first dot.
        raise ValueError(f"basis: a digest of letters, digits, '_' or '-' is required, got {basis!r}")
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_tag_name

    try:  # checked before anything is written: the metric's name is part of a tag key
        _validate_tag_name(_value_tag(basis, metric))
    except MlflowException as e:
        raise ValueError(f"metric {metric!r}: {e.message}") from None


def _finite_or_none(value, metric: str) -> float | None:
    """NaN (a scorer that erred on every row) counts as no value; anything else must be a number."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{metric}: value must be a number or None, got {value!r}") from None
    return number if math.isfinite(number) else None


def _lineage_tags(lineage: Mapping[str, str]) -> dict[str, str]:
    tags = {}
    for key, val in lineage.items():
        bare = key[len(TAG_PREFIX):] if key.startswith(TAG_PREFIX) else key
        if not bare or bare in BOOKKEEPING or bare.startswith("value."):
            raise ValueError(f"lineage key {key!r} is empty or reserved for the registry's own tags")
        tags[TAG_PREFIX + bare] = str(val)
    if not tags.get(TAG_PREFIX + MERGED_KEY):
        raise ValueError(f"lineage: {MERGED_KEY!r} is required (it identifies the registered model)")
    return tags


def _source_uri(model_dir: str | Path) -> str:
    text = str(model_dir)
    if "://" in text:  # already a URI (object store): MLflow records it as is
        return text
    path = Path(text).resolve()
    if not path.is_dir():
        raise ValueError(f"model_dir {text!r} is not a directory")
    return path.as_uri()


def _value_tag(basis: str, metric: str) -> str:
    return f"{VALUE_PREFIX}{basis}.{metric}"


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


def _quoted(text: str) -> str:
    """A string literal for an MLflow search filter."""
    for quote in ("'", '"'):
        if quote not in text:
            return f"{quote}{text}{quote}"
    raise ValueError(f"{text!r} contains both kinds of quotes; MLflow's search filters cannot express it")


def _get_or_create_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _versions_with_merged_key(client, name: str, merged_key: str) -> list:
    found = client.search_model_versions(
        f"name={_quoted(name)} and tags.`{TAG_PREFIX}{MERGED_KEY}`={_quoted(merged_key)}")
    return sorted(found, key=lambda v: int(v.version))


def _model_version(client, name: str, version):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(int(version)))
    except (TypeError, ValueError):
        raise ValueError(f"version must be a version number, got {version!r}") from None
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ValueError(f"registered model {name!r} has no version {version}") from None
        raise


def _alias_holder(client, name: str, alias: str) -> ModelVersionInfo | None:
    from mlflow.exceptions import MlflowException

    try:
        return _info(client.get_model_version_by_alias(name, alias))
    except MlflowException as e:
        # The model or the alias does not exist yet.
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _info(mv) -> ModelVersionInfo:
    tags = dict(mv.tags or {})
    values: dict[tuple[str, str], float] = {}
    lineage: dict[str, str] = {}
    for key, val in tags.items():
        if key.startswith(VALUE_PREFIX):
            basis, _, metric = key[len(VALUE_PREFIX):].partition(".")
            values[(basis, metric)] = float(val)
        elif key.startswith(TAG_PREFIX) and key[len(TAG_PREFIX):] not in BOOKKEEPING:
            lineage[key[len(TAG_PREFIX):]] = val
    value = tags.get(f"{TAG_PREFIX}value")
    return ModelVersionInfo(
        name=mv.name, version=int(mv.version), source=mv.source, run_id=mv.run_id or None,
        metric=tags.get(f"{TAG_PREFIX}metric"), value=float(value) if value is not None else None,
        basis=tags.get(f"{TAG_PREFIX}basis"), lineage=lineage, values=values,
        aliases=tuple(getattr(mv, "aliases", None) or ()), tags=tags)


@contextlib.contextmanager
def _registry_lock(tracking_uri: str) -> Iterator[bool]:
    """A file lock beside a sqlite database (see the module docstring; it also serializes MLflow's
    creation of a new database, which fails when two processes race); nothing for other stores.
    Yields whether it locked."""
    prefix = "sqlite:///"
    db = tracking_uri[len(prefix):].split("?", 1)[0] if tracking_uri.startswith(prefix) else ""
    if not db or db == ":memory:":
        yield False
        return
    from filelock import FileLock

    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".registry.lock"))):
        yield True
