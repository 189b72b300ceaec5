"""Base-model assets: a GGUF base converted once into a safetensors model directory.

One asset per GGUF (`models/<name>`), shared by every experiment that trains on it. The
conversion runs in its own process through Pipes (`python -m trainer.models.convert`); the file
is checked here first (readable, not truncated, an architecture transformers reads), so a bad file
fails with one line before any model is loaded.
"""

import dagster as dg

from trainer.core.config import Experiment
from trainer.core.graph import STAGES
from trainer.core.store import Store
from trainer.models import gguf
from trainer.models.convert import plan_conversion

from .graph import asset_key
from .launch import run_step

REPORTED = ("architecture", "name", "parameters", "model_parameters", "dtype", "tie_word_embeddings", "vocab_size",
            "eos_token", "context_length", "gguf_sha256")


def base_model_asset_key(exp: Experiment) -> dg.AssetKey | None:
    """`models/<name>` for a GGUF base (None for any other base: nothing to convert)."""
    return asset_key(exp, "base_model")


def build_base_model_asset(exp: Experiment) -> dg.AssetsDefinition:
    key = base_model_asset_key(exp)

    @dg.asset(key=key, group_name="models", code_version=STAGES[gguf.STAGE].code_version, kinds={"pytorch", "safetensors"},
              description=f"`{exp.model.base}` converted once from GGUF into a safetensors model directory "
                          "(config, dequantized weights, tokenizer with its chat template, generation config).")
    def base_model(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.Output:
        try:
            file = gguf.gguf_file(exp.model.base, exp.base_dir)
            step = plan_conversion(Store(exp.store_root), file)
            if not step.complete:
                gguf.inspect(file)
        except gguf.GGUFError as e:
            raise dg.Failure(f"model.base: {e}") from None
        cache_hit = run_step(context, pipes_subprocess_client, step, "conversion")
        out = step.output()
        metadata = {"path": dg.MetadataValue.path(str(out.path)), "gguf_file": dg.MetadataValue.path(str(file)),
                    "cache_hit": cache_hit,
                    "quantization": dg.MetadataValue.json(out.manifest.get("tensor_types", {}))}
        metadata.update({name: out.manifest[name] for name in REPORTED if out.manifest.get(name) is not None})
        return dg.Output(out, metadata=metadata, data_version=dg.DataVersion(step.key))

    return base_model
