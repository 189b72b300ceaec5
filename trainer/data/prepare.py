"""The data stages of one experiment, run through the content-addressed store.

raw → templated → tokenized → packed, for the train split and (if configured) the eval split, and
the set-up tokenizer they share (`trainer.data.stages`). Each stage's key is computed from its
inputs' keys and its own parameters before anything is built: a second experiment with the same
data settings finds every key complete and tokenizes nothing. The tokenizer's key is its
identity, remembered in the store under a digest of its source files, so that finding it costs a
few file reads instead of loading the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import re
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core.config import Experiment
from trainer.core.schemas import HELD_OUT
from trainer.core.store import StageOutput, Store, file_digest, write_durably
from trainer.data.formatting_func import formatting_func_identity, refresh_formatting_func
from trainer.data.parallel import ShardBuilder, ShardTask, refuse_in_a_starting_worker
from trainer.data.shards import SourceShard
from trainer.data.sources import check_held_out_files, plan_shards, shards_fingerprint
from trainer.core.graph import DATA_STAGES, STAGES, data_stage_inputs
from trainer.data.stages import (IdentityStage, Inputs, Stage, build_derived, build_packed, build_raw,
                                 held_tokenizer, hold_tokenizer, raw_tasks, source_for,
                                 templated_tasks, tokenized_tasks)
from trainer.models.gguf import GGUFError, gguf_digest, gguf_file, is_gguf_base


@dataclass
class TokenizerBundle:
    tokenizer: Any
    setup: Any
    identity: str
    # Digest of the files it was loaded from (`_tokenizer_source_digest`); None when those are
    # not all local files (a hub id), so the identity may not be remembered under it.
    digest: str | None = None


_LOAD_ATTEMPTS = 3


def _load_tokenizer_bundle(exp: Experiment) -> TokenizerBundle:
    """`exp`'s tokenizer with its chat template set up, and the identity of exactly what was loaded.

    The source digest is taken before and after loading: only when both agree were the files
    read the files digested, so only then may the identity be remembered under that digest.
    """
    from trainer.data.templating import setup_template
    from trainer.data.tokenizer_loading import load_tokenizer, tokenizer_identity

    for _ in range(_LOAD_ATTEMPTS):
        before = _tokenizer_source_digest(exp)
        tok = load_tokenizer(exp.tokenizer, exp.base_dir)
        setup = setup_template(tok, exp.data.template, exp.base_dir)
        bundle = TokenizerBundle(tok, setup, tokenizer_identity(tok), before.digest if before.complete else None)
        if _tokenizer_source_digest(exp) == before:
            return bundle
        # edited while loading: what was read is neither version for sure
    raise RuntimeError(f"tokenizer {exp.tokenizer.path!r} / template {exp.data.template.source!r}: the files "
                       f"changed while being loaded ({_LOAD_ATTEMPTS} attempts); run again once they are written")


# Tokenizers being loaded in the background, by the digest of what they are made from
# (`_tokenizer_source_digest`): a preparation that must build its raw shards starts loading the
# tokenizer beside them (both take about a second for Llama-3's), and the pipeline that then needs
# it (in Dagster, the tokenizer asset's own) takes it from here instead of loading it again.
_BACKGROUND_LOADS: dict[str, Future] = {}
_BACKGROUND_LOCK = threading.Lock()


def _load_in_background(exp: Experiment, digest: str) -> None:
    with _BACKGROUND_LOCK:
        if digest in _BACKGROUND_LOADS:
            return
        loading = _BACKGROUND_LOADS[digest] = Future()

    def load() -> None:
        try:
            loading.set_result(_load_tokenizer_bundle(exp))
        except BaseException as e:  # raised again by the load that takes its place, where it belongs
            loading.set_exception(e)

    # daemon: a run that fails before it needs the tokenizer does not wait for it at exit
    threading.Thread(target=load, name="sftdag-tokenizer-load", daemon=True).start()


def _loaded_in_background(source: "SourceDigest") -> TokenizerBundle | None:
    """The tokenizer loaded in the background for these source files, if one was (waiting for it);
    None when it failed or was made from other files than the ones there now."""
    with _BACKGROUND_LOCK:
        loading = _BACKGROUND_LOADS.pop(source.digest, None)
    if loading is None or loading.exception() is not None:
        return None
    bundle = loading.result()
    return bundle if not source.complete or bundle.digest == source.digest else None


@dataclass(frozen=True)
class SourceDigest:
    digest: str
    # False when the tokenizer is not made from local files only (a hub id): the digest then
    # keys this process's loads, but not the identity cache shared with other processes.
    complete: bool
    # What was hashed (settings, each file's digest, the set-up code's): `sftdag explain` shows it.
    made_from: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def _library_version(name: str) -> str:
    """The version this process runs: the imported module's, else the installed one (which an
    import would load), read without importing it (a cached preparation need not import it)."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    return importlib.metadata.version(name)


@functools.lru_cache(maxsize=1)
def _setup_code_digest() -> str:
    """The tokenizer set-up code, the ChatML template it adds, and the transformers, tokenizers and
    tiktoken versions (they change what a tokenizer does with the same files). Taken once per process:
    code edited after it was imported is not the code that runs."""
    from trainer.data.tokenizer_loading import installed_version

    here = Path(__file__).resolve().parent
    files = [here / "templating.py", here / "tokenizer_loading.py", here.parent / "resources" / "templates" / "chatml.jinja"]
    payload = {"files": [[p.name, file_digest(p)] for p in files],
               "transformers": _library_version("transformers"), "tokenizers": _library_version("tokenizers"),
               "tiktoken": installed_version("tiktoken")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _tokenizer_source_digest(exp: Experiment) -> SourceDigest:
    """Digest of everything a set-up tokenizer is made from: its files, the template file (a path
    or a shipped template's name), the template settings, the set-up code and library versions."""
    from trainer.data import tokenizer_loading as tokenizer_module

    path = exp.tokenizer.path
    complete, gguf = True, None
    if path == "builtin:tiny":
        files = sorted(p for p in tokenizer_module.TINY_TOKENIZER_DIR.iterdir() if p.is_file())
    elif path == "builtin:llama3":
        files = [Path(tokenizer_module.llama3_tokenizer_file()), tokenizer_module.TEMPLATES_DIR / "llama3.jinja"]
    elif is_gguf_base(path):
        files = []  # the GGUF's digest below: remembered, or pinned for a packaged model
        try:
            gguf = gguf_digest(gguf_file(path, exp.base_dir))
        except GGUFError:
            complete = False  # loading it fails with the reason
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
               "files": [[p.name, file_digest(p)] for p in files], **({"gguf": gguf} if gguf else {}),
               "template_file": file_digest(template) if template is not None else None,
               "setup": _setup_code_digest(), "complete": complete}
    return SourceDigest(hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(), complete, payload)


class DataPipeline:
    """The data stages of one experiment. A stage's output is built from its upstream outputs,
    which are given (a Dagster asset receives them) or else produced here first."""

    # True where this process runs every data stage, in order (`run()`; the command, whose Dagster
    # run executes in process, sets it): then raw shards to build start the tokenizer's loading
    # beside them. A Dagster step in a process of its own (the UI's multiprocess runs) leaves it:
    # the tokenizer is another step's, in another process.
    stages_in_one_process = False

    def __init__(self, experiment: Experiment, store: Store | None = None, progress: bool = True,
                 eval_held_out: bool = True):
        """eval_held_out=False: the eval split is not scored as held out (the loop's prompts, which
        may well be the train prompts, come through it), so it may read the train source's files."""
        refuse_in_a_starting_worker()
        self.exp = experiment
        self.eval_held_out = eval_held_out
        self.data = experiment.data
        self.store = store or Store(experiment.store_root)
        self.progress = progress
        self._stages: dict[tuple[str, str | None], Stage] = {}
        self._keys: dict[tuple[str, str | None, tuple[str, ...]], str] = {}
        self._outputs: dict[tuple[str, str], StageOutput] = {}
        self._plans: dict[int, list[SourceShard]] = {}
        self.builder = ShardBuilder(self.store, self.data.num_proc, progress)
        # A formatting function's module edited since this process ran it is reloaded now, before
        # `templated` takes the function (its key then names the code that runs).
        refresh_formatting_func(self.data.formatting_func)

    # -- tokenizer ---------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer_bundle(self) -> TokenizerBundle:
        """The loaded tokenizer; only stages that build need it (loading Llama-3's takes seconds).
        One this process holds already (`trainer.data.stages.held_tokenizer`, by identity) when the
        source files' digest names a remembered identity; else loaded."""
        source = _tokenizer_source_digest(self.exp)
        remembered = self._remembered_identity(source)
        held = held_tokenizer(remembered) if remembered else None
        bundle = (TokenizerBundle(held[0], held[1], remembered, source.digest) if held
                  else _loaded_in_background(source) or _load_tokenizer_bundle(self.exp))
        known = self.__dict__.get("tokenizer_identity")
        if known is not None and known != bundle.identity:
            # The keys were computed for another tokenizer than the one that would build them.
            raise RuntimeError(
                f"tokenizer {self.exp.tokenizer.path!r} / template {self.data.template.source!r} changed while "
                f"preparing (keys name tokenizer {known[:12]}, the files now give {bundle.identity[:12]}); run again")
        hold_tokenizer(bundle.identity, bundle.tokenizer, bundle.setup)  # shards built here use it
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
        remembered = self._remembered_identity(_tokenizer_source_digest(self.exp))
        if remembered is not None:
            return remembered
        bundle = self.tokenizer_bundle
        identities = self.store.root / "tokenizer" / ".identity"
        if bundle.digest is not None:
            identities.mkdir(parents=True, exist_ok=True)
            write_durably(identities / bundle.digest, bundle.identity)
        return bundle.identity

    def _remembered_identity(self, source: SourceDigest) -> str | None:
        path = self.store.root / "tokenizer" / ".identity" / source.digest
        try:  # an identity is 64 hex digits: anything else (a write cut short) is not remembered
            identity = path.read_text() if source.complete else ""
        except OSError:
            return None
        return identity if re.fullmatch(r"[0-9a-f]{64}", identity) else None

    def tokenizer_output(self) -> StageOutput:
        """The tokenizer with its chat template set up, saved once under its identity."""
        return self.output("tokenizer")

    def _save_tokenizer(self, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
        """The tokenizer stage's build (it has no inputs)."""
        from trainer.data.templating import save_tokenizer

        bundle = self.tokenizer_bundle
        save_tokenizer(bundle.tokenizer, bundle.setup, out_dir)
        return {"identity": bundle.identity, "source": self.exp.tokenizer.path, "vocab_size": len(bundle.tokenizer)}

    # -- splits ------------------------------------------------------------------------------
    @property
    def has_eval(self) -> bool:
        return self.data.eval.source is not None or self.data.eval.fraction > 0

    def splits(self) -> list[str]:
        return ["train", "eval"] if self.has_eval else ["train"]

    def raw_version(self) -> str:
        """The raw data's version over all splits: what observing the source and scheduled
        retraining compare."""
        return "+".join(self.raw_key(split) for split in self.splits())

    def shards(self, split: str) -> list[SourceShard]:
        """The split's source cut into shards; train and a carved eval split share one source: planned once."""
        source, _ = source_for(self.data, split)
        if id(source) not in self._plans:
            if self.eval_held_out and source is self.data.eval.source:
                check_held_out_files(self.data.source, source, self.exp.base_dir)
            self._plans[id(source)] = plan_shards(source, self.exp.base_dir, self.data.source_rows_per_shard)
        return self._plans[id(source)]

    def _fingerprint(self, split: str) -> dict[str, Any]:
        """What identifies the split's source records: its shards' bytes, and its `where`."""
        return shards_fingerprint(source_for(self.data, split)[0], self.shards(split))

    # -- stages ------------------------------------------------------------------------------
    def stage(self, name: str, split: str | None = None) -> Stage:
        """Stage `name` of `split` (the tokenizer: of both), made once, when it is first needed:
        making it computes its parameters (the source's hash, the formatting function's code)."""
        memo = (name, None if name == "tokenizer" else split)
        if memo not in self._stages:
            self._stages[memo] = self._make_stage(name, split)
        return self._stages[memo]

    def _make_stage(self, name: str, split: str | None) -> Stage:
        """A data stage as declared in `trainer.core.graph` (its inputs, its key's parameters), with
        its build bound to this experiment and split."""
        exp, progress, builder = self.exp, self.progress, self.builder
        if name == "tokenizer":
            made_from = _tokenizer_source_digest(self.exp).made_from
            return IdentityStage(name, (), {**STAGES[name].params(self.tokenizer_identity), "made_from": made_from},
                                 self._save_tokenizer)
        if name not in DATA_STAGES:
            raise ValueError(f"unknown data stage {name!r} (tokenizer, {', '.join(DATA_STAGES)})")
        inputs, params = data_stage_inputs(name), STAGES[name].params
        if name == "raw":
            shards = self.shards(split)
            return Stage(name, inputs, params(exp, split, self._fingerprint(split), source_for(self.data, split)[1]),
                         functools.partial(build_raw, exp, split, shards, builder),
                         tasks=lambda inputs: raw_tasks(exp, split, shards))
        if name == "templated":
            # reload=False: `__init__` reloaded an edited formatting module; an edit since then is
            # an error, since the function this stage builds with may already be the old one.
            identity = formatting_func_identity(self.data.formatting_func, reload=False)
            tasks = functools.partial(templated_tasks, exp, split, identity)
            return Stage(name, inputs, params(exp, identity), functools.partial(build_derived, name, split, tasks,
                                                                                builder), tasks=tasks)
        if name == "tokenized":
            tasks = functools.partial(tokenized_tasks, split)
            return Stage(name, inputs, params(), functools.partial(build_derived, name, split, tasks, builder),
                         tasks=tasks)
        return Stage(name, inputs, params(exp, split), functools.partial(build_packed, exp, split, progress))

    def key(self, name: str, split: str | None = None, **input_keys: str | None) -> str:
        """The stage's key from its inputs' keys: those given (a Dagster asset has its inputs'),
        the others computed here. Computed once per pipeline."""
        stage = self.stage(name, split)
        inputs = tuple(input_keys.get(up) or self.key(up, split) for up in stage.inputs)
        memo = (name, split, inputs)
        if memo not in self._keys:
            self._keys[memo] = key = stage.key(inputs)
            # what the key is made of, kept beside the outputs: `sftdag explain` says what changed
            self.store.record_key(name, key, dict(zip(stage.inputs, inputs)), stage.params, stage.code_version)
        return self._keys[memo]

    def output(self, name: str, split: str | None = None, **given: StageOutput | None) -> StageOutput:
        """The stage's output from its inputs' outputs (those given, the others produced here):
        found in the store under its key, else built. One store look-up (or build) per pipeline."""
        stage = self.stage(name, split)
        inputs = {up: given.get(up) or self.output(up, split) for up in stage.inputs}
        key = self.key(name, split, **{up: out.key for up, out in inputs.items()})
        if (name, key) not in self._outputs:
            if name == "raw":
                self._start_tokenizer_load(stage, key, inputs)
            self._outputs[name, key] = self.store.get_or_build(name, key, functools.partial(stage.build, inputs))
        return self._outputs[name, key]

    def _start_tokenizer_load(self, raw: Stage, key: str, inputs: Inputs) -> None:
        """Raw shards this process is about to build mean templated shards, which need the tokenizer;
        unless its identity is remembered (then the store has it saved), that means loading it:
        start now, beside them. (The cheap checks first: most calls stop at them.)"""
        if not self.stages_in_one_process or "tokenizer_bundle" in self.__dict__ or self.store.has("raw", key):
            return
        if all(self.store.has("raw", shard) for shard, _ in raw.tasks(inputs)):
            return
        source = _tokenizer_source_digest(self.exp)
        if self._remembered_identity(source) is None:
            _load_in_background(self.exp, source.digest)

    def shard_tasks(self, name: str, split: str, **given: StageOutput | None) -> list[ShardTask]:
        """A sharded stage's shards as (key, build), from its inputs' outputs (those given, the
        others produced here): what a Dagster step per shard builds one of."""
        stage = self.stage(name, split)
        return stage.tasks({up: given.get(up) or self.output(up, split) for up in stage.inputs})

    def complete(self, name: str, split: str, **given: StageOutput) -> bool:
        """Whether the stage's output for these inputs is in the store already."""
        key = self.key(name, split, **{up: out.key for up, out in given.items()})
        return self.store.has(name, key)

    def use_shards(self, split: str, shards: list[SourceShard]) -> None:
        """Take the split's source shards as planned elsewhere (a Dagster step that hashed them)."""
        self._plans[id(source_for(self.data, split)[0])] = shards

    def run(self) -> dict[str, StageOutput]:
        """All data stages for every split, in order; returns {"<stage>/<split>": StageOutput}."""
        self.stages_in_one_process = True
        outputs: dict[str, StageOutput] = {}
        for name in DATA_STAGES:  # stage by stage, as the assets run: the shard workers serve every split
            if name != "raw" and "tokenizer" not in outputs:  # after raw: it loads beside the raw shards
                outputs["tokenizer"] = self.tokenizer_output()
            for split in self.splits():
                outputs[f"{name}/{split}"] = self.output(name, split)
        return outputs

    # -- each stage by name (what the assets and callers use) --------------------------------
    def raw_key(self, split: str) -> str:
        return self.key("raw", split)

    def raw(self, split: str = "train") -> StageOutput:
        return self.output("raw", split)

    def templated(self, split: str = "train", raw: StageOutput | None = None,
                  tokenizer: StageOutput | None = None) -> StageOutput:
        return self.output("templated", split, raw=raw, tokenizer=tokenizer)

    def tokenized(self, split: str = "train", templated: StageOutput | None = None,
                  tokenizer: StageOutput | None = None) -> StageOutput:
        return self.output("tokenized", split, templated=templated, tokenizer=tokenizer)

    def packed(self, split: str = "train", tokenized: StageOutput | None = None) -> StageOutput:
        return self.output("packed", split, tokenized=tokenized)


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
        # A grown source builds only its new shards: how many each sharded stage built, of how many.
        "shards_built": {name.split("/")[0]: f"{0 if o.cache_hit else o.manifest['shards_built']} of "
                                             f"{len(o.manifest['shards'])}"
                         for name, o in outputs.items() if name.endswith("/train") and "shards" in o.manifest},
    }
    if "not_selected" in outputs["raw/train"].manifest["counts"]:  # left out by data.source.where
        summary["not_selected"] = outputs["raw/train"].manifest["counts"]["not_selected"]
    if "packed/eval" in outputs:
        summary["eval_shards"] = str(outputs["packed/eval"].path)
        summary["eval_rows"] = outputs["packed/eval"].manifest["counts"]["rows_out"]
        summary["held_out"] = str(outputs["templated/eval"].path / HELD_OUT)
    return summary
