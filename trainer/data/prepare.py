"""The data stages, run through the content-addressed store.

raw → templated → tokenized → packed, for the train split and (if configured) the eval split.
Each stage's key is computed from its upstream key, its own parameters, the tokenizer's
identity and the stage's code version, before anything is built: a second experiment with the
same data settings finds every key complete and tokenizes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import sys
import threading
import types
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from trainer.core.arrow_io import read_table, write_shards, write_table
from trainer.core.config import Experiment, SourceConfig
from trainer.core import keys
from trainer.core.schemas import IGNORE_INDEX
from trainer.data.sources import build_raw_table, source_fingerprint
from trainer.core.store import Store, StageOutput, content_key, file_digest

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
    # Digest of the files it was loaded from (`_tokenizer_source_digest`); None when those are
    # not all local files (a hub id), so the identity may not be remembered under it.
    digest: str | None = None


# The set-up tokenizers loaded in this process, keyed by their settings AND their source files'
# digest: an edited template or tokenizer directory is a new entry, never the old tokenizer.
_BUNDLES: OrderedDict[tuple[str, str, str | None], TokenizerBundle] = OrderedDict()
_BUNDLES_MAX = 8
_BUNDLES_LOCK = threading.Lock()
_LOAD_ATTEMPTS = 3


def _load_tokenizer_bundle(exp: Experiment) -> TokenizerBundle:
    """`exp`'s tokenizer with its chat template set up, and the identity of exactly what was loaded.

    The source digest is taken before and after loading: only when both agree were the files
    read the files digested, so only then may the identity be remembered under that digest.
    """
    from trainer.data.templating import setup_template
    from trainer.data.tokenizer import load_tokenizer, tokenizer_identity

    settings = json.dumps({"tokenizer": dataclasses.asdict(exp.tokenizer),
                           "template": dataclasses.asdict(exp.data.template)}, sort_keys=True)
    for _ in range(_LOAD_ATTEMPTS):
        before = _tokenizer_source_digest(exp)
        cache_key = (settings, exp.base_dir, before.digest)
        with _BUNDLES_LOCK:
            if cache_key in _BUNDLES:
                _BUNDLES.move_to_end(cache_key)
                return _BUNDLES[cache_key]
        tok = load_tokenizer(exp.tokenizer, exp.base_dir)
        setup = setup_template(tok, exp.data.template, exp.base_dir)
        bundle = TokenizerBundle(tok, setup, tokenizer_identity(tok), before.digest if before.complete else None)
        if _tokenizer_source_digest(exp) != before:
            continue  # edited while loading: what was read is neither version for sure
        with _BUNDLES_LOCK:
            _BUNDLES[cache_key] = bundle
            while len(_BUNDLES) > _BUNDLES_MAX:
                _BUNDLES.popitem(last=False)
        return bundle
    raise RuntimeError(f"tokenizer {exp.tokenizer.path!r} / template {exp.data.template.source!r}: the files "
                       f"changed while being loaded ({_LOAD_ATTEMPTS} attempts); run again once they are written")


def _clear_tokenizer_bundles() -> None:
    with _BUNDLES_LOCK:
        _BUNDLES.clear()


@dataclass(frozen=True)
class SourceDigest:
    digest: str
    # False when the tokenizer is not made from local files only (a hub id): the digest then
    # keys this process's loads, but not the identity cache shared with other processes.
    complete: bool


def _library_version(name: str) -> str:
    """The version this process runs: the imported module's, else the installed one (which an
    import would load), read without importing it (a cached preparation need not import it)."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    return importlib.metadata.version(name)


@functools.lru_cache(maxsize=1)
def _setup_code_digest() -> str:
    """The tokenizer set-up code, the ChatML template it adds, and the transformers and tokenizers
    versions (they change what a tokenizer does with the same files). Taken once per process:
    code edited after it was imported is not the code that runs."""
    here = Path(__file__).resolve().parent
    files = [here / "templating.py", here / "tokenizer.py", here.parent / "resources" / "templates" / "chatml.jinja"]
    payload = {"files": [[p.name, file_digest(p)] for p in files],
               "transformers": _library_version("transformers"), "tokenizers": _library_version("tokenizers")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _tokenizer_source_digest(exp: Experiment) -> SourceDigest:
    """Digest of everything a set-up tokenizer is made from: its files, the template file (a path
    or a shipped template's name), the template settings, the set-up code and library versions."""
    from trainer.data import tokenizer as tokenizer_module

    path = exp.tokenizer.path
    complete = True
    if path == "builtin:tiny":
        files = sorted(p for p in tokenizer_module.TINY_TOKENIZER_DIR.iterdir() if p.is_file())
    elif path == "builtin:llama3":
        files = [Path(tokenizer_module.llama3_tokenizer_file()), tokenizer_module.TEMPLATES_DIR / "llama3.jinja"]
    else:
        local = exp.resolve_path(path)
        if local.is_dir():
            files = sorted(p for p in local.iterdir() if p.is_file())
        elif local.is_file():
            files = [local]
        else:
            files, complete = [], False  # a hub id: identity from the loaded tokenizer only
    template = tokenizer_module.resolve_template_source(exp.data.template.source, exp.base_dir)
    payload = {"tokenizer": dataclasses.asdict(exp.tokenizer), "template": dataclasses.asdict(exp.data.template),
               "files": [[p.name, file_digest(p)] for p in files],
               "template_file": file_digest(template) if template is not None else None,
               "setup": _setup_code_digest(), "complete": complete}
    return SourceDigest(hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(), complete)


# Module name → digest of the file its code in this process was executed from (recorded when this
# module first sees it: a module imported elsewhere and edited before that is not noticed).
_LOADED_MODULES: dict[str, str] = {}
_MODULES_LOCK = threading.RLock()


def _module_name(dotted: str) -> str:
    return dotted.split(":", 1)[0] if ":" in dotted else dotted.rpartition(".")[0]


def _formatting_modules(dotted: str) -> list[types.ModuleType]:
    """The module the formatting function is defined in, then the one the setting names."""
    from trainer.data.formats import load_formatting_func

    func = load_formatting_func(dotted)
    named = sys.modules.get(_module_name(dotted))
    modules = [inspect.getmodule(func), named]
    return [m for i, m in enumerate(modules) if m is not None and m not in modules[:i]]


def _module_digest(module: types.ModuleType) -> str:
    file = getattr(module, "__file__", None)
    if file and os.path.isfile(file):
        return file_digest(file)
    try:  # no file of its own (defined interactively): its source as far as it is known
        return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()
    except (OSError, TypeError):
        return module.__name__


def _reload(module: types.ModuleType) -> None:
    file = getattr(module, "__file__", None)
    if file:
        # The bytecode cache is trusted on source mtime and size: an edit within the same second
        # that keeps the size would reload the old code.
        with contextlib.suppress(NotImplementedError, ValueError, OSError):
            os.unlink(importlib.util.cache_from_source(file))
    importlib.reload(module)


def _formatting_func_identity(dotted: str | None, *, reload: bool = True) -> str | None:
    """The formatting function's code is part of the key: editing its file must re-template, and
    the key must name the code that runs. A module whose file changed since this process
    executed it is reloaded (reload=False: that is an error instead)."""
    if not dotted:
        return None
    from trainer.data.formats import load_formatting_func

    with _MODULES_LOCK:
        for _ in range(_LOAD_ATTEMPTS):
            modules = _formatting_modules(dotted)
            digests = {m.__name__: _module_digest(m) for m in modules}
            stale = [m for m in modules if _LOADED_MODULES.setdefault(m.__name__, digests[m.__name__])
                     != digests[m.__name__]]
            if not stale:
                payload = json.dumps(sorted(digests.items()))
                return dotted + ":" + hashlib.sha256(payload.encode()).hexdigest()[:16]
            where = getattr(stale[0], "__file__", None) or stale[0].__name__
            if not reload:
                raise RuntimeError(f"formatting_func {dotted!r}: {where} changed while preparing "
                                   "(the key would not name the code that ran); run again")
            if any(m.__name__ == "__main__" or getattr(m, "__spec__", None) is None for m in modules):
                # Re-running a script (or a module without an import spec) is no reload.
                raise RuntimeError(f"formatting_func {dotted!r}: {where} changed since this process started; "
                                   "restart it")
            for m in modules:
                _reload(m)
                _LOADED_MODULES[m.__name__] = digests[m.__name__]
            load_formatting_func.cache_clear()
            # Loop: the files must still be what was digested before the reload.
    raise RuntimeError(f"formatting_func {dotted!r}: its module kept changing while being loaded; "
                       "run again once it is written")


def _refresh_formatting_func(dotted: str | None) -> None:
    """Reload the formatting function's module if it was loaded before and its file changed."""
    if not dotted:
        return
    module_name = _module_name(dotted)
    with _MODULES_LOCK:
        tracked = module_name in _LOADED_MODULES and module_name in sys.modules
    if tracked:
        _formatting_func_identity(dotted)


@functools.lru_cache(maxsize=4)
def stored_tokenizer(path: str) -> tuple[Any, Any]:
    """(tokenizer, template set-up) of a tokenizer stage directory (immutable: cached by path)."""
    from transformers import AutoTokenizer

    from trainer.core.template_setup import load_template_setup

    return AutoTokenizer.from_pretrained(path), load_template_setup(path)


class DataPipeline:
    """The data stages of one experiment. Each stage method ensures its upstream, then builds itself."""

    def __init__(self, experiment: Experiment, store: Store | None = None, progress: bool = True):
        self.exp = experiment
        self.data = experiment.data
        self.store = store or Store(experiment.store_root)
        self.progress = progress
        self._keys: dict[tuple[str, str], str] = {}
        self._outputs: dict[tuple[str, str], StageOutput] = {}
        self._tokenizer: StageOutput | None = None
        self._fingerprints: dict[int, dict[str, Any]] = {}
        # A formatting function's module edited since this process ran it is reloaded now, before
        # `templated` takes the function (its key then names the code that runs).
        _refresh_formatting_func(self.data.formatting_func)

    # -- tokenizer ---------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer_bundle(self) -> TokenizerBundle:
        """The loaded tokenizer; only stages that build need it (loading Llama-3's takes seconds)."""
        bundle = _load_tokenizer_bundle(self.exp)
        known = self.__dict__.get("tokenizer_identity")
        if known is not None and known != bundle.identity:
            # The keys were computed for another tokenizer than the one that would build them.
            raise RuntimeError(
                f"tokenizer {self.exp.tokenizer.path!r} / template {self.data.template.source!r} changed while "
                f"preparing (keys name tokenizer {known[:12]}, the files now give {bundle.identity[:12]}); run again")
        return bundle

    @functools.cached_property
    def tokenizer_identity(self) -> str:
        """`tokenizer_identity` of the set-up tokenizer, remembered under a digest of its source files.

        The identity hashes the loaded tokenizer's content; computing it means loading the
        tokenizer. When the tokenizer comes from files, the digest of those files (plus the
        template, its settings, the set-up code and library versions) determines it, so a cache
        hit costs a few file reads. What is remembered is always the identity of a tokenizer
        loaded from files with exactly that digest (`TokenizerBundle.digest`).
        """
        source = _tokenizer_source_digest(self.exp)
        identities = self.store.root / "tokenizer" / ".identity"
        if source.complete and (identities / source.digest).is_file():
            return (identities / source.digest).read_text()
        bundle = self.tokenizer_bundle
        if bundle.digest is not None:
            identities.mkdir(parents=True, exist_ok=True)
            tmp = identities / f".tmp-{bundle.digest}-{os.getpid()}-{threading.get_ident()}"
            tmp.write_text(bundle.identity)
            os.replace(tmp, identities / bundle.digest)
        return bundle.identity

    def tokenizer_output(self) -> StageOutput:
        """The tokenizer with its chat template set up, saved once under its identity."""
        from trainer.data.templating import save_tokenizer

        def build(tmp: Path) -> dict[str, Any]:
            bundle = self.tokenizer_bundle
            save_tokenizer(bundle.tokenizer, bundle.setup, tmp)
            return {"identity": bundle.identity, "source": self.exp.tokenizer.path,
                    "vocab_size": len(bundle.tokenizer)}

        if self._tokenizer is None:
            self._tokenizer = self.store.get_or_build("tokenizer", self.tokenizer_identity, build)
        return self._tokenizer

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
    # A stage's key: its inputs' keys and its own parameters (`trainer.core.keys`), computed once.
    # Given the upstream keys (a Dagster asset has its inputs), nothing upstream is recomputed;
    # without them, they are computed here (the source files hashed once per pipeline).
    def raw_key(self, split: str) -> str:
        return self._key("raw", split, lambda: content_key(
            "raw", inputs=[], params=keys.raw_params(self.exp, split, self._fingerprint(split), self._source_for(split)[1])))

    def templated_key(self, split: str, raw_key: str | None = None, tokenizer_key: str | None = None) -> str:
        # reload=False: `__init__` reloaded an edited formatting module; an edit since then is an
        # error, since `templated` may already hold the old function.
        inputs = [raw_key or self.raw_key(split), tokenizer_key or self.tokenizer_identity]
        return self._key("templated", inputs, lambda: content_key("templated", inputs=inputs, params=keys.templated_params(
            self.exp, _formatting_func_identity(self.data.formatting_func, reload=False))))

    def tokenized_key(self, split: str, templated_key: str | None = None, tokenizer_key: str | None = None) -> str:
        inputs = [templated_key or self.templated_key(split), tokenizer_key or self.tokenizer_identity]
        return self._key("tokenized", inputs, lambda: content_key("tokenized", inputs=inputs, params={}))

    def packed_key(self, split: str, tokenized_key: str | None = None) -> str:
        inputs = [tokenized_key or self.tokenized_key(split)]
        return self._key("packed", inputs, lambda: content_key(
            "packed", inputs=inputs, params=keys.packed_params(self.exp, split)))

    def _output(self, stage: str, key: str, build: Callable[[Path], dict[str, Any]]) -> StageOutput:
        if (stage, key) not in self._outputs:  # one store look-up (or build) per pipeline
            self._outputs[stage, key] = self.store.get_or_build(stage, key, build)
        return self._outputs[stage, key]

    def _tokenizer_of(self, tokenizer: StageOutput) -> tuple[Any, Any]:
        """(tokenizer, template set-up) of a tokenizer stage: the one this pipeline loaded when it
        is that one, else read where it is stored."""
        loaded = self.__dict__.get("tokenizer_bundle")
        if loaded is not None and loaded.identity == tokenizer.key:
            return loaded.tokenizer, loaded.setup
        return stored_tokenizer(str(tokenizer.path))

    def _key(self, stage: str, inputs: Any, compute: Callable[[], str]) -> str:
        memo = (stage, str(inputs))
        if memo not in self._keys:
            self._keys[memo] = compute()
        return self._keys[memo]

    def _fingerprint(self, split: str) -> dict[str, Any]:
        """The source's fingerprint; train and a carved eval split share one source: hashed once."""
        source, _ = self._source_for(split)
        marker = id(source)
        if marker not in self._fingerprints:
            self._fingerprints[marker] = source_fingerprint(source, self.exp.base_dir)
        return self._fingerprints[marker]

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

        return self._output("raw", self.raw_key(split), build)

    def templated(self, split: str = "train", raw: StageOutput | None = None,
                  tokenizer: StageOutput | None = None) -> StageOutput:
        raw = raw or self.raw(split)
        tokenizer = tokenizer or self.tokenizer_output()

        def build(tmp: Path) -> dict[str, Any]:
            from trainer.data.formats import RowError, load_formatting_func, normalize
            from trainer.data.templating import generation_prompt, template_rows

            func = load_formatting_func(self.data.formatting_func) if self.data.formatting_func else None
            tok, setup = self._tokenizer_of(tokenizer)
            raw_table = read_table(raw.path / "rows.arrow")
            rows = list(zip(raw_table.column("row_id").to_pylist(),
                            map(json.loads, raw_table.column("record").to_pylist())))
            table, rejects = template_rows(rows, tok, setup, self.data, formatting_func=func, progress=self.progress)
            write_table(tmp / "rows.arrow", table)
            manifest: dict[str, Any] = {"split": split, "counts": {
                "rows_in": len(rows), "rows_out": table.num_rows, "rejects": len(rejects)},
                "reject_reasons": write_rejects(tmp, "templated", rejects),
                "template": {"end_of_turn": setup.eot_token, "markers_not_special": setup.markers_not_special,
                             "generation_prompt_matches_training": setup.generation_prompt_matches_training}}
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
                            gp = generation_prompt(example, tok, setup, self.data)
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

        return self._output("templated", self.templated_key(split, raw.key, tokenizer.key), build)

    def tokenized(self, split: str = "train", templated: StageOutput | None = None,
                  tokenizer: StageOutput | None = None) -> StageOutput:
        templated = templated or self.templated(split)
        tokenizer = tokenizer or self.tokenizer_output()

        def build(tmp: Path) -> dict[str, Any]:
            from trainer.data.tokenization import tokenize_rows

            table_in = read_table(templated.path / "rows.arrow")
            table, rejects = tokenize_rows(table_in, self._tokenizer_of(tokenizer)[0], progress=self.progress)
            write_table(tmp / "rows.arrow", table)
            labels = table.column("labels").combine_chunks().flatten()
            trainable = int(pa.compute.sum(pa.compute.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
            return {"split": split, "counts": {
                "rows_in": table_in.num_rows, "rows_out": table.num_rows, "rejects": len(rejects),
                "tokens": len(labels), "trainable_tokens": trainable},
                "reject_reasons": write_rejects(tmp, "tokenized", rejects)}

        return self._output("tokenized", self.tokenized_key(split, templated.key, tokenizer.key), build)

    def packed(self, split: str = "train", tokenized: StageOutput | None = None) -> StageOutput:
        tokenized = tokenized or self.tokenized(split)
        d = self.data
        strategy = keys.packing_strategy(self.exp, split)

        def build(tmp: Path) -> dict[str, Any]:
            from trainer.data.packing import length_histogram, pack

            table_in = read_table(tokenized.path / "rows.arrow")
            result = pack(table_in, d.max_length, strategy=strategy, overlong=d.overlong,
                          truncate_side=d.truncate_side, progress=self.progress)
            files = write_shards(tmp, result.table, d.rows_per_shard)
            return {"split": split, "counts": dict(result.counts), "files": files,
                    "rows_per_file": [min(d.rows_per_shard, result.table.num_rows - i * d.rows_per_shard)
                                      for i in range(len(files))],
                    "length_histogram": length_histogram(result.doc_lengths, d.max_length),
                    "reject_reasons": write_rejects(tmp, "packed", result.rejects)}

        return self._output("packed", self.packed_key(split, tokenized.key), build)

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
