"""`sftdag explain EXP [STAGE]`: each stage's key now, whether the store has it, and — when the last
materialization recorded another key — which input or parameter changed.

The keys are computed as a run would compute them (the data stages by `DataPipeline`, training's
by its planner), without building anything; the last materialization's keys come from the Dagster
instance; what each key was made of from the store's key records (`trainer.core.explain`).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.core.config import Experiment
from trainer.core.explain import record_changes
from trainer.core.graph import DATA_STAGES, NODES, STAGE_NODE, data_stage_inputs
from trainer.core.store import Store


@dataclass
class Entry:
    stage: str
    split: str  # "" for a stage that is not per split
    key: str | None  # None: it cannot be planned yet (an upstream is missing)
    node: str  # the asset that materializes it

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.split}" if self.split else self.stage


def current_entries(exp: Experiment) -> list[Entry]:
    """Every stage of the experiment with the key a run would give it now, upstream first."""
    from trainer.data.prepare import DataPipeline
    from trainer.training.launch import planned_keys

    pipeline = DataPipeline(exp, progress=False)
    entries = [Entry("tokenizer", "", pipeline.key("tokenizer"), "tokenizer")]
    for stage in DATA_STAGES:
        entries += [Entry(stage, split, pipeline.key(stage, split), STAGE_NODE[stage]) for split in pipeline.splits()]
    for stage, key in planned_keys(exp, pipeline).items():
        entries.append(Entry(stage, "", key, next(n for n, node in NODES.items()
                                                  if node.scope == "experiment" and stage in node.stages)))
    return entries


def upstream_stages(stage: str) -> set[str]:
    """`stage` and every stage whose key enters its key, transitively."""
    order = {"adapter": ("packed", "tokenizer"), "merged": ("adapter",), "score": ("merged", "templated")}
    found, todo = set(), [stage]
    while todo:
        s = todo.pop()
        if s not in found:
            found.add(s)
            todo += order.get(s) or (data_stage_inputs(s) if s in DATA_STAGES else ())
    return found


def last_materialized(instance, exp: Experiment, entry: Entry) -> str | None:
    """The key the stage's asset recorded at its last materialization (None: never materialized)."""
    from assets.graph import asset_key
    from assets.store_io import latest_metadata

    meta = latest_metadata(instance, asset_key(exp, entry.node))
    keys = meta["sftdag/keys"].value if "sftdag/keys" in meta else {}
    if entry.stage == "score":
        return meta["score_version"].value if "score_version" in meta else None
    return keys.get(entry.split)


def last_keys(instance, exp: Experiment, store: Store, entries: list[Entry]) -> dict[str, tuple[str, str]]:
    """{entry label: (its last key, where that comes from)}: the asset's last materialization, else
    (the data group was renamed: its data settings changed) the key a downstream stage's last key
    was made from, read off that key's record."""
    last: dict[str, tuple[str, str]] = {}
    labels = {e.label for e in entries}
    for e in entries if instance is not None else ():
        key = last_materialized(instance, exp, e)
        if key is not None:
            last[e.label] = (key, "last materialized")
    for e in reversed(entries):  # downstream first: a stage tells its inputs' last keys
        if e.label not in last:
            continue
        key, _ = last[e.label]
        record = store.key_record(e.stage, key)
        for name, input_key in (record or {}).get("inputs", {}).items():
            label = name if name in labels else f"{name}/{e.split}" if f"{name}/{e.split}" in labels else None
            if label is not None and label not in last:
                last[label] = (input_key, f"{e.label}'s last input")
    return last


def explain(exp: Experiment, instance, stage: str | None = None) -> list[str]:
    """The lines `sftdag explain` prints."""
    store = Store(exp.store_root)
    entries = current_entries(exp)
    last = last_keys(instance, exp, store, entries)
    if stage is not None:
        stage = NODES[stage].stage if stage in NODES and NODES[stage].stage else stage
        known = {e.stage for e in entries}
        if stage not in known:
            raise ValueError(f"no stage {stage!r} in {exp.name} (stages: {', '.join(sorted(known))})")
        wanted = upstream_stages(stage)
        entries = [e for e in entries if e.stage in wanted]
    width = max(len(e.label) for e in entries)
    lines = [f"experiment {exp.name}, data group {exp.data_group}, store {store.location}"]
    for e in entries:
        where = "in store " if e.key and store.has(e.stage, e.key) else "not built"
        head = f"{e.label:<{width}}  {(e.key or '?')[:12]:<12}  {where}"
        if e.label not in last:
            lines.append(f"{head}  never materialized")
            continue
        before, source = last[e.label]
        if before == e.key:
            lines.append(f"{head}  = {source}")
            continue
        lines.append(f"{head}  {source} {before[:12]}, since then:")
        old, new = store.key_record(e.stage, before), store.key_record(e.stage, e.key) if e.key else None
        if old is None or new is None:
            missing = before if old is None else (e.key or "?")
            lines.append(f"{'':<{width}}    (no record of what {missing[:12]} was made of in this store)")
            continue
        changes, _ = record_changes(old, new)
        lines += [f"{'':<{width}}    {line}" for line in changes or ["nothing recorded differs"]]
    return lines
