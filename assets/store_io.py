"""Passing stage outputs between assets by reference to the store.

A stage's output is already in the content-addressed store when its asset returns, so nothing is
written here: the materialization records where it is (store, stage, key per split), and a
downstream asset receives the upstream outputs of the upstream asset's latest materialization
(lineage through Dagster's event log, never "the newest folder").
"""

from __future__ import annotations

from typing import Union

import dagster as dg

from trainer.core.store import StageOutput, Store

Outputs = Union[StageOutput, dict[str, StageOutput]]


class StageStoreIOManager(dg.ConfigurableIOManager):
    def handle_output(self, context: dg.OutputContext, obj: Outputs) -> None:
        outputs = obj if isinstance(obj, dict) else {"": obj}
        first = next(iter(outputs.values()))
        metadata = {
            "sftdag/store": str(Store(first.path.parents[1]).location),  # a URL for a remote store: other machines read it
            "sftdag/stage": first.stage,
            "sftdag/keys": dg.MetadataValue.json({split: out.key for split, out in outputs.items()}),
        }
        if any(out.stage != first.stage for out in outputs.values()):  # outputs of several stages (the loop's prompts)
            metadata["sftdag/stages"] = dg.MetadataValue.json({name: out.stage for name, out in outputs.items()})
        context.add_output_metadata(metadata)

    def load_input(self, context: dg.InputContext) -> Outputs:
        partition = context.asset_partition_key if context.has_asset_partitions else None
        return latest_outputs(context.instance, context.asset_key, partition)


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict:
    """The metadata of `key`'s latest materialization (of `partition`), {} when there is none."""
    records = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=key, asset_partitions=[partition] if partition is not None else None), limit=1).records
    return dict(records[0].asset_materialization.metadata) if records and records[0].asset_materialization else {}


def latest_outputs(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> Outputs:
    """The stage outputs of `key`'s latest materialization (of `partition`), opened in the store."""
    meta = latest_metadata(instance, key, partition)
    if "sftdag/keys" not in meta:
        what = key.to_user_string() + (f" partition {partition}" if partition is not None else "")
        raise dg.Failure(f"{what} has not been materialized yet: materialize it first")
    store, stage = Store(meta["sftdag/store"].value), meta["sftdag/stage"].value
    stages = meta["sftdag/stages"].value if "sftdag/stages" in meta else {}
    outputs = {}
    for split, stage_key in meta["sftdag/keys"].value.items():
        its_stage = stages.get(split, stage)
        if not store.has(its_stage, stage_key):
            raise dg.Failure(f"{key.to_user_string()}: {its_stage}/{stage_key} is no longer in {store.root}; "
                             "materialize it again")
        outputs[split] = store.get(its_stage, stage_key)
    return outputs[""] if list(outputs) == [""] else outputs
