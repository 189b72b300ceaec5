"""Asset keys, `ins` and `deps` generated from the declared graph (`trainer.core.graph.NODES`).

Every asset module asks here for its asset's key and for the keys of its upstream nodes, so the
graph Dagster loads is the declared one (tests/test_graph.py checks it). An upstream node that an
experiment does not have (no GGUF base, no loop) is left out; the loop's start model is the one
node `loop.start_model` chooses.
"""

from __future__ import annotations

import re

import dagster as dg

from trainer.core.config import Experiment
from trainer.core.graph import DATA, EXPERIMENT, LOOP, MODELS, NODES, Node
from trainer.models.gguf import is_gguf_base

# Upstream nodes that are the loop's start model: at most one of them applies (`loop.start_model`).
START_MODEL_NODES = ("merged_model", "base_model")


def base_model_name(exp: Experiment) -> str | None:
    """`models/<name>` of a GGUF base (None for any other base: nothing to convert)."""
    if not is_gguf_base(exp.model.base):
        return None
    name = exp.model.base.removeprefix("builtin:").rsplit("/", 1)[-1].removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9_]", "_", name).lower()


def asset_key(exp: Experiment, node: str) -> dg.AssetKey | None:
    """The asset key of `node` for `exp` (None when `exp` has no such asset)."""
    n = NODES[node]
    if n.scope == DATA:
        return dg.AssetKey([exp.data_group, node])
    if n.scope == MODELS:
        name = base_model_name(exp)
        return dg.AssetKey(["models", name]) if name else None
    if n.scope == EXPERIMENT:
        if node == "champion" and not exp.eval.promote.enabled:
            return None
        return dg.AssetKey([exp.name, node])
    assert n.scope == LOOP
    return dg.AssetKey([exp.name, "loop", node]) if exp.loop is not None else None


def _start_model_node(exp: Experiment) -> str | None:
    """The node round 0 generates with (and trains on): the SFT model, a GGUF base's conversion, or
    none (a model directory, or a base that needs no conversion)."""
    from trainer.loop.settings import START_FROM_BASE, loop_config

    start = loop_config(exp).start_model
    if start is None:
        return "merged_model"
    return "base_model" if start == START_FROM_BASE and is_gguf_base(exp.model.base) else None


def applies(exp: Experiment, node: Node, upstream: str) -> bool:
    if node.scope == LOOP and upstream in START_MODEL_NODES:
        return upstream == _start_model_node(exp)
    return asset_key(exp, upstream) is not None


def upstream_keys(exp: Experiment, node: str) -> dict[str, dg.AssetKey]:
    """{upstream node: its asset key} of the upstream nodes `exp` has, inputs then reads."""
    n = NODES[node]
    return {up: asset_key(exp, up) for up in n.upstream if applies(exp, n, up)}


def ins_and_deps(exp: Experiment, node: str, loaded: tuple[str, ...] | None = None
                 ) -> tuple[dict[str, dg.AssetIn], list[dg.AssetKey]]:
    """`ins` (the upstream outputs the asset's function receives, by node name) and `deps` (those it
    only orders after: an observed source, or ones listed outside `loaded`)."""
    ins, deps = {}, []
    for up, key in upstream_keys(exp, node).items():
        if NODES[up].stages and (loaded is None or up in loaded):
            ins[up] = dg.AssetIn(key)
        else:
            deps.append(key)
    return ins, deps
