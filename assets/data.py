"""Data assets: raw dataset → chat-templated text → tokenized rows → packed Arrow shards.

One set per data group (`data.name`, or a hash of the data settings), so experiments with the
same data settings hang off the same assets. The assets are thin: the work and the cache live in
`trainer.data.prepare.DataPipeline`; each asset reports its store key as its data version.
"""


import base64

import dagster as dg

from trainer.core.config import Experiment
from trainer.data.packing import plot_length_histogram
from trainer.data.prepare import DataPipeline
from trainer.core.template_setup import load_template_setup
from trainer.core.store import CODE_VERSIONS, StageOutput

STAGE_ASSETS = {
    "raw": "raw_dataset",
    "templated": "templated_text",
    "tokenized": "tokenized_rows",
    "packed": "packed_shards",
}


def data_asset_key(group: str, stage: str) -> dg.AssetKey:
    return dg.AssetKey([group, STAGE_ASSETS[stage]])


def raw_files_key(group: str) -> dg.AssetKey:
    return dg.AssetKey([group, "raw_files"])


def data_version(outputs: dict[str, StageOutput]) -> str:
    """The stage keys of all splits: the store key of the train split, plus eval's if present."""
    return "+".join(outputs[split].key for split in sorted(outputs, key=lambda s: s != "train"))


def stage_metadata(stage: str, outputs: dict[str, StageOutput]) -> dict:
    meta: dict = {}
    for split, out in outputs.items():
        counts = out.manifest.get("counts", {})
        p = "" if split == "train" else f"{split}_"
        meta[f"{p}rows"] = dg.MetadataValue.int(counts.get("rows_out", 0))
        meta[f"{p}rejects"] = dg.MetadataValue.int(counts.get("rejects", 0))
        meta[f"{p}path"] = dg.MetadataValue.path(str(out.path))
        meta[f"{p}cache_hit"] = dg.MetadataValue.bool(out.cache_hit)
        if "shards" in out.manifest:  # a sharded stage: how many shards, and how many this build made
            meta[f"{p}shards"] = dg.MetadataValue.int(len(out.manifest["shards"]))
            meta[f"{p}shards_built"] = dg.MetadataValue.int(0 if out.cache_hit else out.manifest["shards_built"])
        if out.manifest.get("reject_reasons"):
            meta[f"{p}reject_reasons"] = dg.MetadataValue.json(out.manifest["reject_reasons"])
        for name in ("tokens", "trainable_tokens", "packed_rows", "truncated", "split_rows", "dropped_too_long",
                     "untrainable_rows_dropped"):
            if name in counts:
                meta[f"{p}{name}"] = dg.MetadataValue.int(int(counts[name]))
        if stage == "templated" and split == "train" and "template" in out.manifest:
            # What the chat template does to the trained tokens, per template and tokenizer.
            facts = out.manifest["template"]
            meta["end_of_turn"] = dg.MetadataValue.text(repr(facts["end_of_turn"]))
            meta["markers_not_special"] = dg.MetadataValue.json(facts["markers_not_special"])
            if facts["generation_prompt_matches_training"] is not None:
                meta["generation_prompt_matches_training"] = dg.MetadataValue.bool(
                    facts["generation_prompt_matches_training"])
        if "generation_prompt_differs" in out.manifest:
            meta[f"{p}generation_prompt_differs"] = dg.MetadataValue.int(out.manifest["generation_prompt_differs"])
        if "packing_efficiency" in counts:
            meta[f"{p}packing_efficiency"] = dg.MetadataValue.float(float(counts["packing_efficiency"]))
        if stage == "packed" and split == "train":
            histogram = out.manifest.get("length_histogram", [])
            meta["length_histogram"] = dg.MetadataValue.table(
                records=[dg.TableRecord({k: int(v) for k, v in b.items()}) for b in histogram],
                schema=dg.TableSchema(columns=[dg.TableColumn(k, "int") for k in (histogram[0] if histogram else {})]),
            )
            if histogram:
                png = plot_length_histogram(histogram, int(out.manifest["counts"]["max_length"]))
                meta["length_histogram_plot"] = dg.MetadataValue.md(
                    f"![length histogram](data:image/png;base64,{base64.b64encode(png).decode()})")
    return meta


def total_reject_rate(rows_in: int, stages: list[dict[str, StageOutput]]) -> tuple[float, int, int]:
    """(rate, rejects, rows in) over the train split of the given stages: rows_in == rows_out + rejects."""
    rejects = sum(outputs["train"].manifest["counts"]["rejects"] for outputs in stages)
    return (rejects / rows_in if rows_in else 0.0), rejects, rows_in


def tokenizer_asset_key(group: str) -> dg.AssetKey:
    return dg.AssetKey([group, "tokenizer"])


def build_data_assets(exp: Experiment) -> list:
    """The data assets and source observation of `exp`'s data group. Each asset receives its
    upstream outputs (`StageStoreIOManager`) and computes only its own stage."""
    group = exp.data_group
    description_suffix = f" (data group `{group}`, defined by experiment `{exp.name}`)"

    def pipeline() -> DataPipeline:
        return DataPipeline(exp)

    def result(stage: str, outputs: dict[str, StageOutput], context, checks=()) -> dg.Output:
        for split, out in outputs.items():
            context.log.info(f"{stage}/{split}: {'cache hit' if out.cache_hit else 'built'} {out.path}")
        return dg.Output(outputs, metadata=stage_metadata(stage, outputs),
                         data_version=dg.DataVersion(data_version(outputs)))

    def asset(stage: str, **kwargs):
        return dg.asset(key=data_asset_key(group, stage), group_name=group, code_version=CODE_VERSIONS[stage],
                        kinds={"arrow"}, description=f"{STAGE_ASSETS[stage].replace('_', ' ')}{description_suffix}",
                        **kwargs)

    @dg.observable_source_asset(key=raw_files_key(group), group_name=group,
                                description="The raw source files; observing it hashes their content." + description_suffix)
    def raw_files():
        return dg.DataVersion(pipeline().raw_version())

    @dg.asset(key=tokenizer_asset_key(group), group_name=group, code_version=CODE_VERSIONS["tokenizer"],
              kinds={"huggingface"},
              description="The tokenizer with its chat template set up (its key is its content's identity)"
                          + description_suffix)
    def tokenizer(context: dg.AssetExecutionContext) -> dg.Output:
        out = pipeline().tokenizer_output()
        setup = load_template_setup(out.path)
        return dg.Output(out, data_version=dg.DataVersion(out.key), metadata={
            "path": dg.MetadataValue.path(str(out.path)), "vocab_size": int(out.manifest["vocab_size"]),
            "end_of_turn": dg.MetadataValue.text(repr(setup.eot_token)),
            "added_tokens": dg.MetadataValue.json(setup.added_tokens)})

    @asset("raw", deps=[raw_files_key(group)])
    def raw_dataset(context: dg.AssetExecutionContext) -> dg.Output:
        p = pipeline()
        return result("raw", {split: p.raw(split) for split in p.splits()}, context)

    @asset("templated", ins={"raw": dg.AssetIn(data_asset_key(group, "raw")),
                             "tok": dg.AssetIn(tokenizer_asset_key(group))})
    def templated_text(context: dg.AssetExecutionContext, raw: dict, tok: StageOutput) -> dg.Output:
        p = pipeline()
        return result("templated", {split: p.templated(split, raw[split], tok) for split in raw}, context)

    @asset("tokenized", ins={"templated": dg.AssetIn(data_asset_key(group, "templated")),
                             "tok": dg.AssetIn(tokenizer_asset_key(group))})
    def tokenized_rows(context: dg.AssetExecutionContext, templated: dict, tok: StageOutput) -> dg.Output:
        p = pipeline()
        return result("tokenized", {split: p.tokenized(split, templated[split], tok) for split in templated}, context)

    packed_key = data_asset_key(group, "packed")

    @asset("packed", ins={"tokenized": dg.AssetIn(data_asset_key(group, "tokenized")),
                          "templated": dg.AssetIn(data_asset_key(group, "templated")),
                          "raw": dg.AssetIn(data_asset_key(group, "raw"))},
           check_specs=[dg.AssetCheckSpec("packing_efficiency", asset=packed_key,
                                          description="Packing efficiency of the train shards ≥ "
                                                      "data.checks.min_packing_efficiency"),
                        dg.AssetCheckSpec("reject_rate", asset=packed_key,
                                          description="Rejected rows / raw rows ≤ data.checks.max_reject_rate")])
    def packed_shards(context: dg.AssetExecutionContext, tokenized: dict, templated: dict, raw: dict):
        p = pipeline()
        outputs = {split: p.packed(split, tokenized[split]) for split in tokenized}
        yield result("packed", outputs, context)
        rows_in = raw["train"].manifest["counts"]["rows_in"]
        yield from _packed_checks(exp, outputs, total_reject_rate(rows_in, [raw, templated, tokenized, outputs]))

    return [raw_files, tokenizer, raw_dataset, templated_text, tokenized_rows, packed_shards]


def _packed_checks(exp: Experiment, packed: dict[str, StageOutput],
                   reject_rate: tuple[float, int, int]) -> list[dg.AssetCheckResult]:
    thresholds = exp.data.checks
    efficiency = float(packed["train"].manifest["counts"]["packing_efficiency"])
    rate, rejects, rows_in = reject_rate
    return [
        dg.AssetCheckResult(check_name="packing_efficiency", passed=efficiency >= thresholds.min_packing_efficiency,
                            metadata={"packing_efficiency": efficiency,
                                      "threshold": thresholds.min_packing_efficiency}),
        dg.AssetCheckResult(check_name="reject_rate", passed=rate <= thresholds.max_reject_rate,
                            metadata={"reject_rate": rate, "rejects": rejects, "rows_in": rows_in,
                                      "threshold": thresholds.max_reject_rate}),
    ]
