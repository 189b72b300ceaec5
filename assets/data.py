"""Data assets: raw dataset → chat-templated text → tokenized rows → packed Arrow shards.

One set per data group (`data.name`, or a hash of the data settings), so experiments with the
same data settings hang off the same assets. The assets are thin: the work and the cache live in
`trainer.data.prepare.DataPipeline`; each asset reports its store key as its data version.
"""


import base64
import dataclasses
import json

import dagster as dg

from trainer.core.config import Experiment
from trainer.data.packing import LENGTH_HISTOGRAM_PLOT, plot_length_histogram
from trainer.data.prepare import DataPipeline
from trainer.data.shards import SourceShard
from trainer.core.template_setup import load_template_setup
from trainer.core.graph import DATA_STAGES, NODES, STAGE_NODE, STAGES
from trainer.core.store import StageOutput

from .graph import ins_and_deps

# The per-split data stages' assets (from the declared graph).
STAGE_ASSETS = {stage: STAGE_NODE[stage] for stage in DATA_STAGES}


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
                stored = out.path / LENGTH_HISTOGRAM_PLOT  # absent in outputs packed before it was stored
                png = stored.read_bytes() if stored.exists() else plot_length_histogram(
                    histogram, int(out.manifest["counts"]["max_length"]))
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

    @dg.observable_source_asset(key=raw_files_key(group), group_name=group,
                                description="The raw source files; observing it hashes their content." + description_suffix)
    def raw_files():
        return dg.DataVersion(pipeline().raw_version())

    @dg.asset(key=tokenizer_asset_key(group), group_name=group, code_version=STAGES["tokenizer"].code_version,
              kinds={"huggingface"},
              description="The tokenizer with its chat template set up (its key is its content's identity)"
                          + description_suffix)
    def tokenizer(context: dg.AssetExecutionContext) -> dg.Output:
        out = pipeline().tokenizer_output()
        setup = load_template_setup(out.path)
        return dg.Output(out, data_version=dg.DataVersion(out.key), metadata={
            "path": dg.MetadataValue.path(str(out.path)), "vocab_size": int(out.manifest["vocab_size"]),
            "cache_hit": dg.MetadataValue.bool(out.cache_hit),
            "end_of_turn": dg.MetadataValue.text(repr(setup.eot_token)),
            "added_tokens": dg.MetadataValue.json(setup.added_tokens)})

    def given(stage: str, inputs: dict, split: str) -> dict[str, StageOutput]:
        """A data node's upstream outputs as DataPipeline takes them, by stage: the tokenizer's
        (shared by the splits), the others' of `split`."""
        return {NODES[node].stage: (out if NODES[node].stage == "tokenizer" else out[split])
                for node, out in inputs.items()}

    def stage_asset(stage: str):
        """The asset of one per-split data stage: its `ins` from the declared graph, its body the
        stage itself (DataPipeline builds it from the given upstream outputs, per split)."""
        node = STAGE_NODE[stage]
        ins, deps = ins_and_deps(exp, node)
        checks = _packed_check_specs(exp) if stage == "packed" else None

        @dg.asset(name=node, key_prefix=[group], group_name=group, ins=ins, deps=deps, check_specs=checks,
                  code_version=STAGES[stage].code_version, kinds={"arrow"},
                  description=f"{node.replace('_', ' ')}{description_suffix}")
        def data_stage(context: dg.AssetExecutionContext, **inputs):
            p = pipeline()
            keyed = {up: out for up, out in inputs.items() if up in NODES[node].inputs}
            splits = p.splits() if not keyed else list(next(o for o in keyed.values() if isinstance(o, dict)))
            outputs = {split: p.output(stage, split, **given(stage, keyed, split)) for split in splits}
            if stage == "packed":  # before the output is recorded: no row to train on fails, unrecorded
                stages = [inputs["raw_dataset"], inputs["templated_text"], inputs["tokenized_rows"], outputs]
                rows_in = inputs["raw_dataset"]["train"].manifest["counts"]["rows_in"]
                checks = _packed_checks(exp, outputs, total_reject_rate(rows_in, stages), stages)
            yield result(stage, outputs, context)
            if stage == "packed":
                yield from checks

        return data_stage

    if exp.data.step_per_shard:
        sharded = _step_per_shard_assets(exp, pipeline, result, given)
    else:
        sharded = [stage_asset(stage) for stage in DATA_STAGES if STAGES[stage].sharded]
    return [raw_files, tokenizer, *sharded, stage_asset("packed")]


def _packed_check_specs(exp: Experiment) -> list[dg.AssetCheckSpec]:
    packed_key = data_asset_key(exp.data_group, "packed")
    return [dg.AssetCheckSpec("packing_efficiency", asset=packed_key,
                              description="Packing efficiency of the train shards ≥ data.checks.min_packing_efficiency"),
            dg.AssetCheckSpec("reject_rate", asset=packed_key,
                              description="Rejected rows / raw rows ≤ data.checks.max_reject_rate")]


def _packed_checks(exp: Experiment, packed: dict[str, StageOutput], reject_rate: tuple[float, int, int],
                   stages: list[dict[str, StageOutput]] = ()) -> list[dg.AssetCheckResult]:
    """The checks' results; a dg.Failure (its one line is what `sftdag` prints) when no row of a
    split came through: a failed check would still let training start on nothing, or train with
    an evaluation of nothing."""
    for split in packed if stages else ():
        failure = _no_rows_failure(exp, split, stages)
        if failure is not None:
            raise failure
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


def _no_rows_failure(exp: Experiment, split: str, stages: list[dict[str, StageOutput]]) -> dg.Failure | None:
    """Why no row of `split` came through its stages (raw … packed), or None when some did."""
    from trainer.data.stages import source_for

    raw = stages[0][split].manifest["counts"]
    if stages[-1][split].manifest["counts"]["rows_out"] and raw.get("rows_out"):
        return None
    rows_in = raw.get("rows_in", 0)
    rejects = sum(outputs[split].manifest["counts"]["rejects"] for outputs in stages)
    source, carved = source_for(exp.data, split)
    reasons = []
    for outputs in stages:
        out = outputs[split]
        top = sorted(out.manifest.get("reject_reasons", {}).items(), key=lambda r: -r[1])[:3]
        reasons += [f"{out.stage}: " + ", ".join(f"{n} {why}" for why, n in top)] if top else []
    if raw.get("not_selected"):
        reasons.append(f"{raw['not_selected']} not selected by {source.key}.where")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    if rows_in and rejects >= rows_in:
        what = f"all {rows_in} rows were rejected"
    elif rows_in:
        what = f"no row of {rows_in} came through"
    elif split == "eval" and carved:
        what = f"the held-out fraction ({exp.data.eval.fraction} of {source.key}) has no rows"
    else:
        what = f"the source ({source.key}: {source.path or source.hub or source.builtin}) has no rows"
    where, nothing = ("data", "nothing to train on") if split == "train" else ("data.eval", "nothing to evaluate on")
    return dg.Failure(description=f"{where}: {what}{why} — {nothing}", allow_retries=False)


# -- one Dagster step per shard ------------------------------------------------------------------
# raw, templated and tokenized as graphs: a step lists the split's shards missing from the store,
# one step builds each (the executor spreads them: processes here, pods on Kubernetes), and a last
# step writes the split's index, exactly as the one-step asset does. The shards' source plan is
# hashed once, by the first step, and kept in the store for the others (`.plans/<run id>.json`).

def _step_per_shard_assets(exp: Experiment, pipeline, result, given) -> list:
    group = exp.data_group

    def plan_file(p: DataPipeline, run_id: str):
        return p.store.root / "raw" / ".plans" / f"{run_id}.json"

    def opened(stage: str, context, inputs: dict) -> tuple[DataPipeline, list[str]]:
        """A pipeline for this step, and the splits; raw's shards as the plan step hashed them."""
        p = pipeline()
        splits = list(next((o for o in inputs.values() if isinstance(o, dict)), None) or p.splits())
        if stage == "raw":
            path = plan_file(p, context.run_id)
            if path.is_file():
                for split, shards in json.loads(path.read_text()).items():
                    p.use_shards(split, [SourceShard(**s) for s in shards])
        return p, splits

    def graph_asset(stage: str):
        node = STAGE_NODE[stage]
        asset_ins, deps = ins_and_deps(exp, node)
        loaded = list(asset_ins)
        # an observed source is a Nothing input: it orders the steps and is never loaded
        asset_ins.update({key.path[-1]: dg.AssetIn(key, dagster_type=dg.Nothing) for key in deps})
        ins = {name: dg.In() if name in loaded else dg.In(dg.Nothing) for name in asset_ins}
        prefix = f"{group}__{stage}"

        def stage_inputs(inputs: dict) -> dict:
            return {name: out for name, out in inputs.items() if name in loaded}

        @dg.op(name=f"{prefix}_plan", ins=ins, out=dg.DynamicOut(dg.Nothing))
        def plan(context: dg.OpExecutionContext, **inputs):
            inputs = stage_inputs(inputs)
            p, splits = opened(stage, context, inputs)
            if stage == "raw":
                path = plan_file(p, context.run_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({split: [dataclasses.asdict(s) for s in p.shards(split)]
                                            for split in splits}))
            for split in splits:
                if p.complete(stage, split, **given(stage, inputs, split)):
                    continue
                tasks = p.shard_tasks(stage, split, **given(stage, inputs, split))
                missing = [i for i, (key, _) in enumerate(tasks) if not p.store.has(stage, key)]
                context.log.info(f"{stage}/{split}: {len(missing)} of {len(tasks)} shards to build")
                for i in missing:
                    yield dg.DynamicOutput(None, mapping_key=f"{split}_{i}")

        @dg.op(name=f"{prefix}_shard", ins={"planned": dg.In(dg.Nothing), **ins}, out=dg.Out(dg.Nothing))
        def shard(context: dg.OpExecutionContext, **inputs) -> None:
            inputs = stage_inputs(inputs)
            p, _ = opened(stage, context, inputs)
            split, index = context.get_mapping_key().rsplit("_", 1)
            key, build = p.shard_tasks(stage, split, **given(stage, inputs, split))[int(index)]
            out = p.store.get_or_build(stage, key, build)
            context.log.info(f"{stage}/{split} shard {index}: {'cache hit' if out.cache_hit else 'built'} "
                             f"{out.manifest.get('counts')}")

        @dg.op(name=f"{prefix}_index", ins={"shards": dg.In(dg.Nothing), **ins})
        def index(context: dg.OpExecutionContext, **inputs) -> dg.Output:
            inputs = stage_inputs(inputs)
            p, splits = opened(stage, context, inputs)
            return result(stage, {split: p.output(stage, split, **given(stage, inputs, split)) for split in splits},
                          context)

        @dg.graph_multi_asset(name=f"{group}__{node}", group_name=group, ins=asset_ins, outs={"result": dg.AssetOut(
            key=data_asset_key(group, stage), code_version=STAGES[stage].code_version, kinds={"arrow"},
            description=f"{node.replace('_', ' ')}, one step per shard (data group `{group}`, defined by "
                        f"experiment `{exp.name}`)")})
        def stage_graph(**inputs):
            planned = plan(**inputs)
            return index(shards=planned.map(lambda s: shard(planned=s, **inputs)).collect(), **inputs)

        return stage_graph

    return [graph_asset(stage) for stage in DATA_STAGES if STAGES[stage].sharded]
