"""What enters each stage's key: the one place that decides it.

A key is `content_key(stage, inputs=[upstream keys], params, code_version)`. The upstream keys
carry everything upstream; `params` are a stage's own settings, and only those that change its
bytes. Settings that only change what is measured or reported (held-out rows scored, samples
logged, logging interval, evaluation cadence, checkpoint cadence, tracking, scheduling) stay out,
so changing them never rebuilds or retrains anything.

| stage | params |
| --- | --- |
| raw | source fingerprint (its shards' contents), split, hold-out settings when carved from the source; a raw shard: that shard's bytes, file and first line, `where`, split, hold-out settings |
| tokenizer | its identity (content, chat template, library versions: `trainer.data.tokenizer_loading.tokenizer_identity`) |
| templated (and each shard: its raw shard instead of raw) | format, fields, masking, formatting function (its code), response/instruction templates, empty_assistant_turns (inputs: raw, tokenizer) |
| tokenized | nothing of its own (inputs: templated, tokenizer; a shard: its templated shard, tokenizer) |
| packed | max_length, packing strategy, overlong, truncate_side, rows_per_shard |
| adapter | `training` minus `TRAINING_REPORTING`, `loss_chunk_tokens` and `gradient_checkpointing`, its precision as this machine resolves it (with keep_checkpoints: the checkpoint cadence too; an init_adapter by its content), `model`, the base weights' identity (inputs: packed train [+ eval], tokenizer) |
| merged | training mode (input: adapter) |
| score | held-out rows scored, max new tokens, the scorers (a verifier with its code) (inputs: merged, the held-out prompts file's sha256 or "none") |
| samples | the round, generation settings, stop texts (inputs: generator model, prompts) |
| accepted | filters, the code of their verifier/scorer functions, the round's data mode, SFT replay (fraction, the SFT raw train split's key; only when replaying) (inputs: samples, prompts, previous accepted) |

A round's training reuses the stages above: its accepted rows are a data source (raw → packed)
and its adapter is keyed like any adapter, on the starting model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainer.core.config import Experiment, TrainingConfig

# Training settings that change what is measured or reported, never the trained weights.
TRAINING_REPORTING = (
    "accuracy_rows", "sample_generations", "max_new_tokens", "logging_steps",
    "eval_strategy", "eval_steps", "per_device_eval_batch_size",
    "save_strategy", "save_steps", "save_total_limit", "gpu",
    # Where the processes run, not what they compute: num_processes is the total over all machines
    # and stays in the key (with the per-device batch and accumulation it makes the global batch), so
    # moving the same run from 1 machine x 8 GPUs to 2 x 4 keeps its adapter, and every machine (each
    # with its own rank) plans the same key and reads the same shards.
    "num_machines", "machine_rank", "main_process_ip", "main_process_port",
)


def _holdout(exp: Experiment, carved: bool) -> dict[str, Any] | None:
    if not carved:
        return None
    # the eval split is carved out of the source: how it is carved
    return {k: v for k, v in dataclasses.asdict(exp.data.eval).items() if k not in ("source", "pack")}


def tokenizer_params(identity: str) -> dict[str, Any]:
    """The tokenizer stage's key is its identity itself (`trainer.data.tokenizer_loading.tokenizer_identity`)."""
    return {"identity": identity}


def raw_params(exp: Experiment, split: str, source_fingerprint: dict[str, Any], carved: bool) -> dict[str, Any]:
    return {"source": source_fingerprint, "split": split, "holdout": _holdout(exp, carved)}


def raw_shard_params(exp: Experiment, split: str, where: dict | None, shard_fingerprint: dict[str, Any],
                     carved: bool) -> dict[str, Any]:
    """One shard of the raw split: its own bytes only, so a grown source keeps the others' keys."""
    return {"shard": shard_fingerprint, "where": where, "split": split, "holdout": _holdout(exp, carved)}


def templated_params(exp: Experiment, formatting_func_identity: str | None) -> dict[str, Any]:
    d = exp.data
    return {"format": d.format, "fields": dataclasses.asdict(d.fields), "masking": d.masking,
            "formatting_func": formatting_func_identity, "response_template": d.response_template,
            "instruction_template": d.instruction_template, "empty_assistant_turns": d.empty_assistant_turns}


def tokenized_params() -> dict[str, Any]:
    return {}  # everything is in its inputs: the templated rows and the tokenizer


def packing_strategy(exp: Experiment, split: str) -> str:
    d = exp.data
    return d.packing if (split == "train" or d.eval.pack) else "none"


def packed_params(exp: Experiment, split: str) -> dict[str, Any]:
    d = exp.data
    return {"max_length": d.max_length, "packing": packing_strategy(exp, split), "overlong": d.overlong,
            "truncate_side": d.truncate_side, "rows_per_shard": d.rows_per_shard}


def adapter_training_params(training: TrainingConfig) -> dict[str, Any]:
    """The training settings that change an adapter's output: all but TRAINING_REPORTING and what
    changes only memory (loss_chunk_tokens, gradient_checkpointing), the precision resolved on this machine (the device a training here runs on). With
    `keep_checkpoints` the output holds the checkpoints, so the cadence that picks them
    (save_strategy, save_steps, save_total_limit) counts too; `keep_checkpoints: false` stays out,
    so adapters trained before the setting existed keep their keys."""
    params = {k: v for k, v in dataclasses.asdict(training).items() if k not in TRAINING_REPORTING}
    # The precision trained in, as resolved on this machine (`precision: auto` is bf16 on one
    # machine and fp32 on another: two adapters), written as the bf16/fp16 switches were, so an
    # fp32 adapter keeps the key it had before `precision` existed. The loss's chunking changes
    # memory, not the loss.
    resolved = training.resolved_precision()
    params.update(bf16=resolved == "bf16", fp16=resolved == "fp16")
    del params["precision"], params["loss_chunk_tokens"]
    # Recomputing activations changes memory and time, not the weights (tested): keyed as its old
    # default whatever it is, so adapters trained before it left the key keep their keys.
    params["gradient_checkpointing"] = False
    if training.keep_checkpoints:
        params.update(save_strategy=training.save_strategy, save_steps=training.save_steps,
                      save_total_limit=training.save_total_limit)
    else:
        del params["keep_checkpoints"]
    return params


def adapter_params(exp: Experiment, base_identity: dict[str, Any], tokenizer_identity: str,
                   init_adapter: str | None = None) -> dict[str, Any]:
    """`init_adapter`: the content identity of the adapter `training.lora.init_adapter` continues
    (`trainer.training.launch.init_adapter_identity`); it stands in the key for the path, so the
    same adapter anywhere is the same key and an adapter retrained in place is a new one."""
    training = adapter_training_params(exp.training)
    if init_adapter is not None:
        training["lora"]["init_adapter"] = {"content": init_adapter}
    return {"training": training, "model": dataclasses.asdict(exp.model), "base": base_identity,
            "tokenizer": tokenizer_identity}


def base_model_params(versions: dict[str, str]) -> dict[str, Any]:
    """A GGUF's conversion (its input: the file's sha256): the library versions that dequantize it."""
    return {"versions": versions}


def merged_params(exp: Experiment) -> dict[str, Any]:
    return {"mode": exp.training.mode}


def score_params(exp: Experiment, scorers: list[Any]) -> dict[str, Any]:
    """The rows scored, the answers' length, and the scorers (`eval.scorers`) each as written, a
    verifier with its code (`trainer.training.scorers.scorers_identity`, computed by the caller), so
    editing a scorer rescores the same merged model."""
    return {"accuracy_rows": exp.training.accuracy_rows, "max_new_tokens": exp.training.max_new_tokens,
            "scorers": scorers}


def samples_params(round_index: int, generation: dict[str, Any], stop_tokens: list[str]) -> dict[str, Any]:
    return {"round": round_index, "generation": generation, "stop_tokens": stop_tokens}


def accepted_params(filters: list[Any], drop_truncated: bool, filter_code: dict[str, str], data_mode: str,
                    replay: dict[str, Any] | None = None) -> dict[str, Any]:
    """`replay`: {"fraction", "sft_raw": the SFT raw train split's key, "seed": [generation seed,
    round]} when a round replays SFT rows (`loop.training.replay` > 0); None otherwise, so rounds
    that replay nothing keep their keys."""
    # all_rounds adds only the rows earlier rounds lack (keys differ from the version that appended all)
    data = {"data": data_mode, "union": "new_rows"} if data_mode == "all_rounds" else {"data": data_mode}
    return {"filters": filters, "drop_truncated": drop_truncated, "filter_code": filter_code, **data,
            **({"replay": replay} if replay else {})}
