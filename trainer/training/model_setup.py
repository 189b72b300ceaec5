"""The model a training run trains: the base loaded (quantized for QLoRA), its embeddings grown
for the tokens the template set-up added, and a LoRA adapter on it (or the whole model for
`mode: full`). New-token rows are always trained, even where a padded vocabulary did not grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.core.config import Experiment
from trainer.training.base_model import embedding_rows, load_model, resize_for_tokenizer
from trainer.training.reporting import Reporter


@dataclass
class TrainableModel:
    model: Any
    base_rows: int  # embedding rows of the base before resizing
    new_token_ids: list[int]  # ids of the tokens the set-up added: their rows are trained


def check_mode_available(mode: str) -> None:
    """QLoRA needs bitsandbytes and CUDA: fail before any work when they are missing."""
    if mode not in ("qlora4", "qlora8"):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(f"training.mode {mode}: bitsandbytes is not installed (pip install bitsandbytes); "
                           "use mode lora or full on this machine") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"training.mode {mode}: bitsandbytes quantization needs a CUDA GPU and none is available; "
                           "use mode lora or full on this machine")


def added_token_ids(tokenizer, added_tokens: list[str]) -> list[int]:
    """The ids of the tokens the data stage's template set-up added (new special tokens)."""
    ids = set()
    for token in added_tokens or []:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def base_vocab_size(tokenizer, added_tokens: list[str]) -> int:
    """The tokenizer's vocabulary before the data stage added its special tokens: trailing ids
    that belong to `added_tokens` are not part of the base (a builtin model is built without
    them, so they exercise the resize + train-new-rows path like a real base model would)."""
    n = len(tokenizer)
    added_ids = set(added_token_ids(tokenizer, added_tokens))
    while n - 1 in added_ids:
        n -= 1
    return n


def new_token_modules(model, new_ids: list[int]) -> dict[str, list[int]]:
    """{module name: new token ids} for the input embedding and an untied output projection."""
    names = {}
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is None or out.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if module is emb:
            names["input"] = name.rsplit(".", 1)[-1]
        elif out is not None and module is out and not tied:
            names["output"] = name.rsplit(".", 1)[-1]
    return {n: list(new_ids) for n in names.values()}


def _quantization(experiment: Experiment, device) -> dict[str, Any]:
    tc = experiment.training
    if tc.mode not in ("qlora4", "qlora8"):
        return {}
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if tc.resolved_precision() == "bf16" else torch.float16
    if tc.mode == "qlora4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                    bnb_4bit_use_double_quant=True)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device}}


def build_trainable_model(experiment: Experiment, tokenizer, base_path: str, added_tokens: list[str],
                          reporter: Reporter, device) -> TrainableModel:
    tc = experiment.training
    quantization = _quantization(experiment, device)
    model = load_model(base_path, experiment.model, **quantization)
    base_rows = embedding_rows(model)
    added = resize_for_tokenizer(model, tokenizer)
    # The new tokens are those the set-up added, wherever their rows are: a base model whose
    # vocabulary is padded past the tokenizer (Qwen2.5, Phi-2, Pythia) grows nothing, yet the
    # rows of the new ids were never trained and must be.
    new_ids = added_token_ids(tokenizer, added_tokens)
    if added:
        reporter.info("tokenizer has %d tokens, base model %d rows: resized embeddings by %d rows",
                      len(tokenizer), base_rows, added)
    if new_ids:
        reporter.info("the %d tokens the template set-up added (ids %s) will be trained", len(new_ids),
                      ", ".join(map(str, new_ids)))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=tc.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.to(device)
    if tc.mode != "full":
        model = apply_lora(model, experiment, new_ids, reporter)
    return TrainableModel(model, base_rows, new_ids)


def apply_lora(model, experiment: Experiment, new_ids: list[int], reporter: Reporter):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    lc = experiment.training.lora
    if lc.init_adapter:
        path = experiment.resolve_path(lc.init_adapter)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"training.lora.init_adapter: no adapter_config.json in {path}")
        reporter.info("continuing training of the adapter in %s", path)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        if new_ids:
            cfg = model.peft_config["default"]
            covered = cfg.trainable_token_indices or {}
            saved = set(cfg.modules_to_save or [])
            if not covered and not {"embed_tokens", "lm_head"} & saved:
                reporter.warning("the tokenizer added %d tokens but adapter %s does not train new embedding rows",
                                 len(new_ids), path)
        return model

    user_saved = list(lc.modules_to_save or [])
    kwargs: dict[str, Any] = dict(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        use_rslora=lc.use_rslora, bias=lc.bias, modules_to_save=user_saved or None, task_type="CAUSAL_LM",
    )
    token_modules = {k: v for k, v in new_token_modules(model, new_ids).items() if k not in user_saved} if new_ids else {}
    if token_modules:
        try:
            peft_model = get_peft_model(model, PeftLoraConfig(**kwargs, trainable_token_indices=token_modules))
            reporter.info("training the %d new token rows (ids %d..%d) of %s through peft trainable_token_indices",
                          len(new_ids), new_ids[0], new_ids[-1], ", ".join(token_modules))
            return peft_model
        except (ValueError, TypeError, NotImplementedError, KeyError) as e:
            reporter.warning("peft trainable_token_indices failed (%s); training whole %s via modules_to_save",
                             e, ", ".join(token_modules))
            kwargs["modules_to_save"] = user_saved + [m for m in token_modules if m not in user_saved]
    return get_peft_model(model, PeftLoraConfig(**kwargs))
