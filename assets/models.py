"""Base-model assets: a GGUF base converted once into a safetensors model directory.

One asset per GGUF (`models/<name>`), shared by every experiment that trains on it. The
conversion runs in its own process through Pipes (`python -m trainer.models.convert`); the file
is checked here first (readable, not truncated, an architecture transformers reads), so a bad file
fails with one line before any model is loaded.
"""

import re
import sys

import dagster as dg

from trainer.core.config import Experiment
from trainer.core.store import CODE_VERSIONS, Store
from trainer.models import gguf
from trainer.models.convert import ConversionSpec

REPORTED = ("architecture", "name", "parameters", "model_parameters", "dtype", "tie_word_embeddings", "vocab_size",
            "eos_token", "context_length", "gguf_sha256")


def base_model_asset_key(exp: Experiment) -> dg.AssetKey | None:
    """`models/<name>` for a GGUF base (None for any other base: nothing to convert)."""
    if not gguf.is_gguf_base(exp.model.base):
        return None
    name = exp.model.base.removeprefix("builtin:").rsplit("/", 1)[-1].removesuffix(".gguf")
    return dg.AssetKey(["models", re.sub(r"[^A-Za-z0-9_]", "_", name).lower()])


def build_base_model_asset(exp: Experiment) -> dg.AssetsDefinition:
    key = base_model_asset_key(exp)

    @dg.asset(key=key, group_name="models", code_version=CODE_VERSIONS[gguf.STAGE], kinds={"pytorch", "safetensors"},
              description=f"`{exp.model.base}` converted once from GGUF into a safetensors model directory "
                          "(config, dequantized weights, tokenizer with its chat template, generation config).")
    def base_model(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.Output:
        try:
            file = gguf.gguf_file(exp.model.base, exp.base_dir)
            conversion_key = gguf.conversion_key(file)
            store = Store(exp.store_root)
            cache_hit = store.has(gguf.STAGE, conversion_key)
            if not cache_hit:
                gguf.inspect(file)
        except gguf.GGUFError as e:
            raise dg.Failure(f"model.base: {e}") from None
        if not cache_hit:
            spec = ConversionSpec(file, store.location, conversion_key).write(
                store.root / gguf.STAGE / ".specs" / f"{conversion_key}.json")
            pipes_subprocess_client.run(command=conversion_command(spec), context=context)
            if not store.has(gguf.STAGE, conversion_key):
                raise dg.Failure(f"conversion exited without writing {store.path(gguf.STAGE, conversion_key)}")
        out = store.publish(gguf.STAGE, conversion_key)
        metadata = {"path": dg.MetadataValue.path(str(out.path)), "gguf_file": dg.MetadataValue.path(str(file)),
                    "cache_hit": cache_hit,
                    "quantization": dg.MetadataValue.json(out.manifest.get("tensor_types", {}))}
        metadata.update({name: out.manifest[name] for name in REPORTED if out.manifest.get(name) is not None})
        return dg.Output(out, metadata=metadata, data_version=dg.DataVersion(conversion_key))

    return base_model


def conversion_command(spec_path) -> list[str]:
    return [sys.executable, "-m", "trainer.models.convert", str(spec_path)]
