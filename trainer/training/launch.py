"""Plans for the training stages: the adapter's, the merged model's and the scores' process steps
(keys, spec, command).

Nothing here trains: `trainer.training.train` does, in its own process (so a crash cannot take the
orchestrator with it), `trainer.training.merge` merges and `trainer.training.score` scores. This module decides *what* to train, where
the result goes, and whether it already exists.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core import keys
from trainer.core.config import ConfigError, Experiment
from trainer.core.identity import directory_identity, skip_work_files
from trainer.core.process_step import ProcessStep
from trainer.core.schemas import HELD_OUT, MERGE_INFO, SCORE
from trainer.core.store import StageOutput, Store, content_key, file_digest
from trainer.core.template_setup import load_template_setup
from trainer.data.prepare import DataPipeline
from trainer.models.gguf import STAGE as GGUF_STAGE
from trainer.models.gguf import is_gguf_base
from trainer.training.spec import MergeSpec, ScoreSpec, TrainingSpec, TrainingSummary


def model_identity(exp: Experiment, resolved_base: str) -> dict[str, Any]:
    """What identifies the base weights: the config (hash in the directory name) for the builtin
    model; the conversion key for a GGUF base, or for a directory that is a conversion in this
    experiment's store (a loop starting from the converted base); the digests of its files for any
    other local model; id+revision for the hub."""
    from trainer.training.base_model import BUILTIN_TINY_LLAMA

    base = Path(resolved_base)
    if exp.model.base == BUILTIN_TINY_LLAMA:
        return {"builtin": base.name}  # named by its config's hash
    if is_gguf_base(exp.model.base):
        return {"gguf": base.name}  # planned (maybe not converted yet): named by the file's digest and versions
    if base.is_dir():
        store = Store(exp.store_root)
        if _same_path(base, store.path(GGUF_STAGE, base.name)) and store.has(GGUF_STAGE, base.name):
            return {"gguf": base.name}
        return {"local": directory_identity(base)}
    # a hub model by the commit its revision names now: a branch that moves is a new key
    from trainer.core.identity import IdentityError, hub_commit

    try:
        return {"hub": exp.model.base, "commit": hub_commit(exp.model.base, exp.model.revision, "model")}
    except IdentityError as e:
        raise ConfigError(f"model.base: {e}") from None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def init_adapter_identity(exp: Experiment) -> str | None:
    """The content of the adapter `training.lora.init_adapter` continues (None without one): it
    enters the adapter key, so an adapter retrained in place is trained on again. A directory that
    is no adapter fails here, in one line, before any process starts."""
    lora = exp.training.lora
    if not lora.init_adapter or exp.training.mode == "full":
        return None
    path = exp.resolve_path(lora.init_adapter)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"training.lora.init_adapter: {path}: no adapter_config.json")
    return directory_identity(path, exclude=skip_work_files)


@dataclass
class TrainingStep(ProcessStep):
    """Training an adapter (or a full model): `python -m trainer.training.train SPEC`, under
    `accelerate launch` for several processes."""

    data_version: str = ""  # the packed shards' keys it trains (and evaluates) on
    base_model: str = ""  # the planned base: a path or a hub id

    def command(self) -> list[str]:
        return training_command(self.spec.experiment, self.spec_path)

    def summary(self) -> TrainingSummary:
        return TrainingSummary.from_dict(self.output().manifest)


def held_out_file(templated_eval: StageOutput | None) -> Path | None:
    """The held-out generation prompts a templated eval split wrote, when there is one."""
    return templated_eval.path / HELD_OUT if templated_eval is not None else None


def held_out_path(data: dict[str, StageOutput]) -> Path | None:
    return held_out_file(data.get("templated/eval"))


def plan_adapter(exp: Experiment, data: dict[str, StageOutput] | None = None,
                 tags: dict[str, str] | None = None, held_out: Path | None = None) -> TrainingStep:
    """What to train: from the data stages' outputs (a Dagster asset receives them), or, without
    them, from running the data stages (every one a cache hit once prepared). `held_out`: the
    prompts to score on when the data has no eval split of its own (a loop round's)."""
    from trainer.training.base_model import is_built_here

    pipeline = DataPipeline(exp, progress=False)
    store = pipeline.store
    outputs = data if data is not None else pipeline.run()
    tokenizer = outputs["tokenizer"].manifest
    setup = load_template_setup(outputs["tokenizer"].path)
    train_key = outputs["packed/train"].key
    eval_key = outputs["packed/eval"].key if "packed/eval" in outputs else None
    key, base_model = adapter_key(exp, store, train_key, eval_key, tokenizer["identity"],
                                  tokenizer["vocab_size"] - len(setup.added_tokens))
    data_version = train_key + (f"+{eval_key}" if eval_key else "")
    raw = "+".join(outputs[f"raw/{split}"].key for split in pipeline.splits())
    spec = TrainingSpec(
        experiment=exp, train_shards=outputs["packed/train"].path, tokenizer_dir=outputs["tokenizer"].path,
        output_dir=store.path("adapter", key), eval_shards=outputs["packed/eval"].path if eval_key else None,
        held_out=held_out_path(outputs) if eval_key else held_out,
        base_model=None if is_built_here(exp.model) else base_model,
        tags={"data_version": data_version, "adapter_version": key, "experiment": exp.name, "raw_version": raw,
              "data_group": exp.data_group, **(tags or {})})
    return TrainingStep("adapter", key, store, spec, "trainer.training.train", data_version=data_version,
                        base_model=base_model).write_spec()


def adapter_key(exp: Experiment, store: Store, train_key: str, eval_key: str | None, tokenizer_identity: str,
                base_vocab: int) -> tuple[str, str]:
    """(the adapter's key, the planned base model) from the packed shards' keys and the tokenizer.
    The builtin model is built, a GGUF converted, by the processes, never here (no torch in the
    orchestrator): the base is only planned."""
    from trainer.training.base_model import planned_base_model

    base_model = planned_base_model(exp.model, store.root, base_vocab, exp.base_dir)
    params = keys.adapter_params(exp, model_identity(exp, base_model), tokenizer_identity,
                                 init_adapter=init_adapter_identity(exp))
    inputs = {"packed/train": train_key, **({"packed/eval": eval_key} if eval_key else {})}
    return store.key("adapter", inputs, params), base_model


def planned_keys(exp: Experiment, pipeline: DataPipeline) -> dict[str, str | None]:
    """{"adapter", "merged", "score": key} a run would give them now, building nothing (the score:
    None until the held-out prompts it is keyed by exist). `sftdag explain` reads these."""
    store = pipeline.store
    identity = pipeline.key("tokenizer")
    if store.has("tokenizer", identity):
        tok = store.get("tokenizer", identity)
        base_vocab = tok.manifest["vocab_size"] - len(load_template_setup(tok.path).added_tokens)
    else:
        bundle = pipeline.tokenizer_bundle
        base_vocab = len(bundle.tokenizer) - len(bundle.setup.added_tokens)
    eval_key = pipeline.key("packed", "eval") if pipeline.has_eval else None
    adapter, _ = adapter_key(exp, store, pipeline.key("packed", "train"), eval_key, identity, base_vocab)
    merged = merged_key(exp, store, adapter)
    held_out = None
    if pipeline.has_eval:
        templated = pipeline.key("templated", "eval")
        # get, not path: the templated index may be only in the remote store (built by another machine)
        held_out = store.get("templated", templated).path / HELD_OUT if store.has("templated", templated) else None
    score = score_key(exp, store, merged, held_out) if held_out is not None or not pipeline.has_eval else None
    return {"adapter": adapter, "merged": merged, "score": score}


MACHINE_RANK_ENV = "SFTDAG_MACHINE_RANK"


def training_command(exp: Experiment, spec_path: Path) -> list[str]:
    """`python -m trainer.training.train SPEC`, or under `accelerate launch` for several processes,
    on this machine or on several (this machine's rank: $SFTDAG_MACHINE_RANK when set, else
    `training.machine_rank`, so one YAML serves every machine)."""
    tc = exp.training
    if tc.num_processes <= 1:
        return [sys.executable, "-m", "trainer.training.train", str(spec_path)]
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA trainer.training.train joins
    # the processes over gloo. (--cpu would start a single process without an MPI hostfile.) The machine
    # settings are passed explicitly: they win over an `accelerate config` file on the machine.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(tc.num_processes), "--num_machines", str(tc.num_machines), "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    if tc.num_machines > 1:
        command += ["--machine_rank", str(machine_rank(exp)), "--main_process_ip", str(tc.main_process_ip),
                    "--main_process_port", str(tc.main_process_port)]
    from trainer.core.entry_point import dying_with_parent

    return dying_with_parent(command + ["-m", "trainer.training.train", str(spec_path)])  # the launcher dies with us


def machine_rank(exp: Experiment) -> int:
    value = os.environ.get(MACHINE_RANK_ENV, "").strip()
    if not value:
        return exp.training.machine_rank
    try:
        rank = int(value)
    except ValueError:
        raise ConfigError(f"{MACHINE_RANK_ENV}: {value!r} is not an integer machine rank") from None
    exp.training.check_machine_rank(rank, MACHINE_RANK_ENV)
    return rank


@dataclass
class MergeStep(ProcessStep):
    """Merging an adapter into its base: `python -m trainer.training.merge SPEC` leaves the merged model."""


def plan_merge(exp: Experiment, adapter: StageOutput, tokenizer_dir: Path) -> MergeStep:
    """Merge the finished `adapter` (received from its asset) into its base model."""
    summary = TrainingSummary.from_dict(adapter.manifest)
    store = Store(exp.store_root)
    key = merged_key(exp, store, adapter.key)
    spec = MergeSpec(adapter_dir=adapter.path, base_model=summary.base_model_path, tokenizer_dir=Path(tokenizer_dir),
                     store=store.location, merged_key=key, eot_token=summary.eot_token)
    return MergeStep("merged", key, store, spec, "trainer.training.merge").write_spec()


@dataclass
class ScoreStep(ProcessStep):
    """Scoring the trained model and the model it was trained from on the held-out prompts:
    `python -m trainer.training.score SPEC` leaves each score (`<store>/score/<key>/score.json`)."""

    @property
    def score_key(self) -> str:
        return self.key

    @property
    def base_score_key(self) -> str | None:
        base = self.spec.models.get("base")
        return base["score_key"] if base else None

    @property
    def checkpoint_roles(self) -> list[str]:
        """`step-<N>` of each kept checkpoint scored, by step."""
        return sorted((r for r in self.spec.models if r.startswith("step-")), key=lambda r: int(r[5:]))

    def score(self, role: str = "merged") -> dict[str, Any]:
        """A model's held-out figures (its `score.json`): `merged` (the trained model), `base` or `step-<N>`."""
        key = self.spec.models[role]["score_key"]
        return json.loads((self.store.get("score", key).path / SCORE).read_text())

    def answers_path(self, role: str = "merged") -> Path:
        from trainer.training.score import ANSWERS

        return self.store.get("score", self.spec.models[role]["score_key"]).path / ANSWERS


def held_out_digest(held_out: Path | None) -> str:
    """What the held-out prompts enter the score key as: their file's sha256, or "none"."""
    return file_digest(held_out) if held_out is not None else "none"


def plan_score(exp: Experiment, merged: StageOutput, adapter: StageOutput, tokenizer_dir: Path,
               held_out: Path | None, score_base: bool = True, base_key: str | None = None) -> ScoreStep:
    """Score the merged model (and, with `score_base`, the base it was trained from: the
    "before"; `base_key`: its key when the caller knows it, else its identity) on `held_out`.
    Each score is keyed by its model, the held-out prompts' content, the rows scored and the
    scorers' code: new prompts or a changed scorer rescore the same models, never merge or train
    again; the base's score is shared by every model trained from it."""
    summary = TrainingSummary.from_dict(adapter.manifest)
    models = {"merged": (merged.path, merged.key, {"adapter_version": adapter.key, "merged_version": merged.key})}
    if score_base and held_out is not None:
        # the base by its key when the caller has one (a loop's starting model), else by its identity
        base = base_key or json.dumps(model_identity(exp, summary.base_model_path), sort_keys=True)
        models["base"] = (summary.base_model_path, base, {"base_model": summary.base_model})
    if held_out is not None:  # the checkpoints training kept (`training.keep_checkpoints`), by step
        for checkpoint in summary.checkpoints:
            path, step = adapter.path / checkpoint["path"], int(checkpoint["step"])
            lora = (path / "adapter_config.json").is_file()  # a LoRA checkpoint merged in memory; a full one as is
            models[f"step-{step}"] = (summary.base_model_path if lora else path, f"{adapter.key}@step-{step}",
                                      {"adapter_version": adapter.key, "step": step}, *((path,) if lora else ()))
    return _plan_scores(exp, models, Path(tokenizer_dir), summary.eot_token, held_out)


def plan_model_score(exp: Experiment, model_dir: Path, model_key: str | None, held_out: Path | None) -> ScoreStep:
    """Score a standalone model directory (a merged model: its tokenizer and end-of-turn text
    inside) on `held_out`, keyed by `model_key` when known, else by its files' digests."""
    info = model_dir / MERGE_INFO
    eot = json.loads(info.read_text()).get("eot_token") if info.is_file() else None
    key = model_key or json.dumps({"local": directory_identity(model_dir)}, sort_keys=True)
    return _plan_scores(exp, {"merged": (model_dir, key, {"merged_version": model_key or ""})}, model_dir, eot,
                        held_out)


def _plan_scores(exp: Experiment, models: dict[str, tuple], tokenizer_dir: Path, eot_token: str | None,
                 held_out: Path | None) -> ScoreStep:
    """The step scoring `models` ({role: (model dir, model key, versions[, a LoRA adapter merged into
    it in memory])}); its own key: the first's score key."""
    store = Store(exp.store_root)
    basis = score_basis_of(exp, held_out)
    spec_models = {role: {"model_dir": str(path), "score_key": score_key(exp, store, key, held_out),
                          "versions": {**versions, "basis": basis}, **({"adapter_dir": str(lora[0])} if lora else {})}
                   for role, (path, key, versions, *lora) in models.items()}
    spec = ScoreSpec(store=store.location, tokenizer_dir=tokenizer_dir, models=spec_models,
                     accuracy_rows=exp.training.accuracy_rows, max_new_tokens=exp.training.max_new_tokens,
                     eot_token=eot_token, held_out=held_out, **_scorer_fields(exp))
    first, *others = spec_models.values()
    return ScoreStep("score", first["score_key"], store, spec, "trainer.training.score",
                     also=tuple(("score", m["score_key"]) for m in others)).write_spec()


def score_basis_of(exp: Experiment, held_out: Path | None) -> str:
    """What a score is measured on, apart from the model: the held-out prompts' content, the rows
    scored and the scorers with their code. Two scores are comparable only on one basis."""
    from trainer.training.scorers import experiment_scorers, scorers_identity

    params = keys.score_params(exp, scorers_identity(experiment_scorers(exp)))
    return content_key("score", inputs=[held_out_digest(held_out)], params=params)  # the scoring code's version too


def score_basis(score: dict[str, Any]) -> str | None:
    """The basis a score.json was measured on (`score_basis_of`)."""
    return score.get("basis")


def _scorer_fields(exp: Experiment) -> dict[str, Any]:
    """The ScoreSpec's scorers: `eval.scorers`, or a loop's verifier, or `[exact]` (`trainer.training.scorers`)."""
    from trainer.training.scorers import scorer_specs

    specs, where = scorer_specs(exp)
    return {"scorers": specs, "scorers_where": where, "scorers_base_dir": str(exp.base_dir)}


def merged_key(exp: Experiment, store: Store, adapter_key: str) -> str:
    return store.key("merged", {"adapter": adapter_key}, keys.merged_params(exp))


def score_key(exp: Experiment, store: Store, model: str, held_out: Path | None) -> str:
    """Keyed by the model scored (its key), the held-out prompts' content, the rows scored and the
    scorers with their code: new prompts or a changed scorer rescore the same model, never merge again."""
    from trainer.training.scorers import experiment_scorers, scorers_identity

    scorers = scorers_identity(experiment_scorers(exp))  # a verifier that does not import fails here
    return store.key("score", {"model": model, "held_out": held_out_digest(held_out)},
                     keys.score_params(exp, scorers))
