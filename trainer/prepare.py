"""The data stages, run through the content-addressed store.

raw → templated → tokenized → packed, for the train split and (if configured) the eval split.
Each stage's key is computed from its upstream key, its own parameters, the tokenizer's
identity and the stage's code version, before anything is built: a second experiment with the
same data settings finds every key complete and tokenizes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .arrow_io import read_table, write_shards, write_table
from .config import Experiment, SourceConfig
from .sources import build_raw_table, source_fingerprint
from .store import Store, StageOutput, content_key, file_digest

REJECTS_SCHEMA = pa.schema([("row_id", pa.int64()), ("stage", pa.string()), ("reason", pa.string())])
SPLITS = ("train", "eval")


def write_rejects(directory: Path, stage: str, rejects: list[tuple[int, str]]) -> dict[str, int]:
    table = pa.table([pa.array([r for r, _ in rejects], pa.int64()), pa.array([stage] * len(rejects), pa.string()),
                      pa.array([why for _, why in rejects], pa.string())], schema=REJECTS_SCHEMA)
    write_table(directory / "rejects.arrow", table)
    return reason_counts(rejects)


def reason_counts(rejects: list[tuple[int, str]]) -> dict[str, int]:
    # Group reasons by their kind (text before the first colon) so counts stay readable.
    return dict(Counter(why.split(":")[0] for _, why in rejects).most_common())


def read_rejects(stage_output: StageOutput) -> pa.Table:
    return read_table(stage_output.path / "rejects.arrow")


@dataclass
class TokenizerBundle:
    tokenizer: Any
    setup: Any
    identity: str


@functools.lru_cache(maxsize=8)
def _load_tokenizer_bundle(tokenizer_cfg_json: str, template_cfg_json: str, base_dir: str) -> TokenizerBundle:
    from .config import TemplateConfig, TokenizerConfig
    from .templating import setup_template
    from .tokenizer import load_tokenizer, tokenizer_identity

    tok = load_tokenizer(TokenizerConfig(**json.loads(tokenizer_cfg_json)), base_dir)
    setup = setup_template(tok, TemplateConfig(**json.loads(template_cfg_json)), base_dir)
    return TokenizerBundle(tok, setup, tokenizer_identity(tok))


def _tokenizer_source_digest(exp: Experiment) -> str | None:
    """Digest of everything a set-up tokenizer is made from, when it is made from local files."""
    from . import templating, tokenizer as tokenizer_module

    path = exp.tokenizer.path
    if path == "builtin:tiny":
        files = sorted(tokenizer_module.TINY_TOKENIZER_DIR.iterdir())
    elif path == "builtin:llama3":
        files = [Path(tokenizer_module.llama3_tokenizer_file()), tokenizer_module.TEMPLATES_DIR / "llama3.jinja"]
    else:
        local = exp.resolve_path(path)
        if local.is_dir():
            files = sorted(p for p in local.iterdir() if p.is_file())
        elif local.is_file():
            files = [local]
        else:
            return None  # a hub id: identity from the loaded tokenizer
    template = exp.data.template.source
    if template not in ("tokenizer", "chatml"):
        files.append(exp.resolve_path(template))
    code = [inspect.getsource(m) for m in (templating, tokenizer_module)]
    payload = {"tokenizer": dataclasses.asdict(exp.tokenizer), "template": template,
               "files": [[p.name, file_digest(p)] for p in files if p.is_file()],
               "code": hashlib.sha256("".join(code).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _formatting_func_identity(dotted: str | None) -> str | None:
    """The formatting function's code is part of the key: editing it must re-template."""
    if not dotted:
        return None
    from .formats import load_formatting_func

    func = load_formatting_func(dotted)
    try:
        source = inspect.getsource(inspect.getmodule(func))
    except (OSError, TypeError):
        source = dotted
    return dotted + ":" + hashlib.sha256(source.encode()).hexdigest()[:16]


class DataPipeline:
    """The data stages of one experiment. Each stage method ensures its upstream, then builds itself."""

    def __init__(self, experiment: Experiment, store: Store | None = None, progress: bool = True):
        self.exp = experiment
        self.data = experiment.data
        self.store = store or Store(experiment.store_root)
        self.progress = progress

    # -- tokenizer ---------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer_bundle(self) -> TokenizerBundle:
        """The loaded tokenizer; only stages that build need it (loading Llama-3's takes seconds)."""
        return _load_tokenizer_bundle(json.dumps(dataclasses.asdict(self.exp.tokenizer), sort_keys=True),
                                      json.dumps(dataclasses.asdict(self.data.template), sort_keys=True),
                                      self.exp.base_dir)

    @functools.cached_property
    def tokenizer_identity(self) -> str:
        """`tokenizer_identity` of the set-up tokenizer, remembered under a digest of its source files.

        The identity hashes the loaded tokenizer's content; computing it means loading the
        tokenizer. When the tokenizer comes from files, the digest of those files (plus the
        template and the set-up code) determines it, so a cache hit costs a few file reads.
        """
        digest = _tokenizer_source_digest(self.exp)
        cache = self.store.root / "tokenizer" / ".identity" / digest if digest else None
        if cache is not None and cache.is_file():
            return cache.read_text()
        identity = self.tokenizer_bundle.identity
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(identity)
            os.replace(tmp, cache)
        return identity

    def tokenizer_output(self) -> StageOutput:
        """The tokenizer with its chat template set up, saved once under its identity."""
        from .templating import save_tokenizer

        def build(tmp: Path) -> dict[str, Any]:
            bundle = self.tokenizer_bundle
            save_tokenizer(bundle.tokenizer, bundle.setup, tmp)
            return {"identity": bundle.identity, "source": self.exp.tokenizer.path,
                    "vocab_size": len(bundle.tokenizer),
                    "template": dataclasses.asdict(bundle.setup)}

        return self.store.get_or_build("tokenizer", self.tokenizer_identity, build)

    # -- splits ------------------------------------------------------------------------------
    @property
    def has_eval(self) -> bool:
        return self.data.eval.source is not None or self.data.eval.fraction > 0

    def splits(self) -> list[str]:
        return ["train", "eval"] if self.has_eval else ["train"]

    def _source_for(self, split: str) -> tuple[SourceConfig, bool]:
        """(source, whether the eval fraction is carved out of it)"""
        if split == "eval" and self.data.eval.source is not None:
            return self.data.eval.source, False
        return self.data.source, self.data.eval.source is None and self.data.eval.fraction > 0

    # -- keys --------------------------------------------------------------------------------
    def raw_key(self, split: str) -> str:
        source, carved = self._source_for(split)
        params = {"source": source_fingerprint(source, self.exp.base_dir), "split": split,
                  "holdout": dataclasses.asdict(self.data.eval) if carved else None}
        if params["holdout"]:
            params["holdout"].pop("source", None)
            params["holdout"].pop("pack", None)
        return content_key("raw", inputs=[], params=params)

    def templated_key(self, split: str) -> str:
        d = self.data
        params = {"format": d.format, "fields": dataclasses.asdict(d.fields), "masking": d.masking,
                  "formatting_func": _formatting_func_identity(d.formatting_func),
                  "response_template": d.response_template, "instruction_template": d.instruction_template,
                  "tokenizer": self.tokenizer_identity}
        return content_key("templated", inputs=[self.raw_key(split)], params=params)

    def tokenized_key(self, split: str) -> str:
        return content_key("tokenized", inputs=[self.templated_key(split)],
                           params={"tokenizer": self.tokenizer_identity})

    def packed_key(self, split: str) -> str:
        d = self.data
        strategy = d.packing if (split == "train" or d.eval.pack) else "none"
        params = {"max_length": d.max_length, "packing": strategy, "overlong": d.overlong,
                  "truncate_side": d.truncate_side, "rows_per_shard": d.rows_per_shard}
        return content_key("packed", inputs=[self.tokenized_key(split)], params=params)

    # -- stages ------------------------------------------------------------------------------
    def raw(self, split: str = "train") -> StageOutput:
        source, carved = self._source_for(split)

        def build(tmp: Path) -> dict[str, Any]:
            table = build_raw_table(source, self.exp.base_dir, self.data.eval if carved else None, side=split)
            errors = table.column("error")
            bad = errors.is_valid()
            rejects = [(int(r), f"malformed record at {w}: {e}") for r, w, e in zip(
                table.column("row_id").filter(bad).to_pylist(), table.column("source").filter(bad).to_pylist(),
                errors.filter(bad).to_pylist())]
            good = table.filter(pa.compute.invert(bad))
            write_table(tmp / "rows.arrow", good)
            return {"split": split, "counts": {"rows_in": table.num_rows, "rows_out": good.num_rows,
                                               "rejects": len(rejects)},
                    "reject_reasons": write_rejects(tmp, "raw", rejects)}

        return self.store.get_or_build("raw", self.raw_key(split), build)

    def templated(self, split: str = "train") -> StageOutput:
        from .formats import RowError, load_formatting_func, normalize
        from .templating import generation_prompt, template_rows

        raw = self.raw(split)
        func = load_formatting_func(self.data.formatting_func) if self.data.formatting_func else None

        def build(tmp: Path) -> dict[str, Any]:
            bundle = self.tokenizer_bundle
            raw_table = read_table(raw.path / "rows.arrow")
            rows = list(zip(raw_table.column("row_id").to_pylist(),
                            map(json.loads, raw_table.column("record").to_pylist())))
            table, rejects = template_rows(rows, bundle.tokenizer, bundle.setup, self.data,
                                           formatting_func=func, progress=self.progress)
            write_table(tmp / "rows.arrow", table)
            manifest: dict[str, Any] = {"split": split, "counts": {
                "rows_in": len(rows), "rows_out": table.num_rows, "rejects": len(rejects)},
                "reject_reasons": write_rejects(tmp, "templated", rejects),
                "template": {"end_of_turn": bundle.setup.eot_token,
                             "markers_not_special": bundle.setup.markers_not_special,
                             "generation_prompt_matches_training": bundle.setup.generation_prompt_matches_training}}
            if split == "eval":
                # Prompts exactly as inference sends them (the template's generation prompt).
                rejected = {r for r, _ in rejects}
                differs = 0
                with open(tmp / "held_out.jsonl", "w", encoding="utf-8") as f:
                    written = 0
                    for row_id, record in rows:
                        if row_id in rejected:
                            continue
                        try:
                            example = normalize(record, self.data, func)
                            gp = generation_prompt(example, bundle.tokenizer, bundle.setup, self.data)
                        except RowError:
                            continue
                        reference = gp.reference
                        if isinstance(record, dict) and isinstance(record.get("answer"), str):
                            reference = record["answer"]
                        differs += not gp.matches_training
                        f.write(json.dumps({"row_id": row_id, "prompt": gp.prompt, "reference": reference}) + "\n")
                        written += 1
                manifest["held_out_prompts"] = written
                # Rows whose training text before the answer is not the generation prompt.
                manifest["generation_prompt_differs"] = differs
            return manifest

        return self.store.get_or_build("templated", self.templated_key(split), build)

    def tokenized(self, split: str = "train") -> StageOutput:
        from .tokenization import tokenize_rows

        templated = self.templated(split)

        def build(tmp: Path) -> dict[str, Any]:
            table_in = read_table(templated.path / "rows.arrow")
            table, rejects = tokenize_rows(table_in, self.tokenizer_bundle.tokenizer, progress=self.progress)
            write_table(tmp / "rows.arrow", table)
            labels = table.column("labels").combine_chunks().flatten()
            trainable = int(pa.compute.sum(pa.compute.not_equal(labels, -100)).as_py() or 0)
            return {"split": split, "counts": {
                "rows_in": table_in.num_rows, "rows_out": table.num_rows, "rejects": len(rejects),
                "tokens": len(labels), "trainable_tokens": trainable},
                "reject_reasons": write_rejects(tmp, "tokenized", rejects)}

        return self.store.get_or_build("tokenized", self.tokenized_key(split), build)

    def packed(self, split: str = "train") -> StageOutput:
        from .packing import length_histogram, pack

        tokenized = self.tokenized(split)
        d = self.data
        strategy = d.packing if (split == "train" or d.eval.pack) else "none"

        def build(tmp: Path) -> dict[str, Any]:
            table_in = read_table(tokenized.path / "rows.arrow")
            result = pack(table_in, d.max_length, strategy=strategy, overlong=d.overlong,
                          truncate_side=d.truncate_side, progress=self.progress)
            files = write_shards(tmp, result.table, d.rows_per_shard)
            return {"split": split, "counts": dict(result.counts), "files": files,
                    "rows_per_file": [min(d.rows_per_shard, result.table.num_rows - i * d.rows_per_shard)
                                      for i in range(len(files))],
                    "length_histogram": length_histogram(result.doc_lengths, d.max_length),
                    "reject_reasons": write_rejects(tmp, "packed", result.rejects)}

        return self.store.get_or_build("packed", self.packed_key(split), build)

    def run(self) -> dict[str, StageOutput]:
        """All data stages for every split; returns {"<stage>/<split>": StageOutput}."""
        outputs: dict[str, StageOutput] = {"tokenizer": self.tokenizer_output()}
        for split in self.splits():
            for stage in ("raw", "templated", "tokenized", "packed"):
                outputs[f"{stage}/{split}"] = getattr(self, stage)(split)
        return outputs


def summarize(outputs: dict[str, StageOutput]) -> dict[str, Any]:
    """The numbers a user wants after preparation: where the shards are and what came through."""
    train = outputs["packed/train"].manifest["counts"]
    rows_in = outputs["raw/train"].manifest["counts"]["rows_in"]
    rejects = sum(o.manifest["counts"]["rejects"] for name, o in outputs.items()
                  if name.endswith("/train") and "counts" in o.manifest)
    summary = {
        "shards": str(outputs["packed/train"].path),
        "data_version": outputs["packed/train"].key,
        "tokenizer_dir": str(outputs["tokenizer"].path),
        "rows_in": rows_in,
        "rows_out": train["rows_out"],
        "rejects": rejects,
        "packed_rows": train["packed_rows"],
        "tokens": train["tokens"],
        "trainable_tokens": train["trainable_tokens"],
        "packing_efficiency": train["packing_efficiency"],
        "cache_hits": sorted(name for name, o in outputs.items() if o.cache_hit),
    }
    if "packed/eval" in outputs:
        summary["eval_shards"] = str(outputs["packed/eval"].path)
        summary["eval_rows"] = outputs["packed/eval"].manifest["counts"]["rows_out"]
        summary["held_out"] = str(outputs["templated/eval"].path / "held_out.jsonl")
    return summary
