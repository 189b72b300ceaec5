"""transformers `TrainingArguments` from the experiment's `training` settings, and the device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.core.config import Experiment


def use_cpu() -> bool:
    """Train on CPU processes: asked for (ACCELERATE_USE_CPU), or several processes and no GPU.

    accelerate only sets up a multi-process CPU group (gloo) when told `cpu=True`; without it a
    torchrun/`accelerate launch --multi_gpu` job on a CPU machine would run N independent copies.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def training_arguments(experiment: Experiment, work: Path, has_eval: bool, device: torch.device | None = None,
                       precision: str | None = None):
    """`device`: where this process trains (its PartialState's); `precision`: fp32, bf16 or fp16,
    as `TrainingConfig.resolved_precision` gives it (resolved here when None)."""
    from transformers import TrainingArguments

    tc = experiment.training
    precision = precision or tc.resolved_precision()
    on_cpu = use_cpu() or (device is not None and device.type == "cpu")
    # transformers 5 takes the ratio as a float < 1 in warmup_steps.
    warmup: float = tc.warmup_steps if tc.warmup_steps else float(tc.warmup_ratio)
    if not tc.warmup_steps and not 0.0 <= warmup < 1.0:
        raise ValueError(f"training.warmup_ratio must be in [0, 1), got {tc.warmup_ratio}")
    return TrainingArguments(
        output_dir=str(work),
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler_type,
        warmup_steps=warmup,
        num_train_epochs=tc.num_train_epochs,
        max_steps=tc.max_steps,
        per_device_train_batch_size=tc.per_device_train_batch_size,
        per_device_eval_batch_size=tc.per_device_eval_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=tc.gradient_checkpointing,  # transformers' new name for it
        activation_checkpointing_kwargs={"use_reentrant": False} if tc.gradient_checkpointing else None,
        neftune_noise_alpha=tc.neftune_noise_alpha,
        seed=tc.seed,
        data_seed=tc.seed,
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        eval_strategy=tc.eval_strategy if has_eval else "no",
        eval_steps=tc.eval_steps,
        save_strategy=tc.save_strategy,
        save_steps=tc.save_steps,
        save_total_limit=tc.save_total_limit,
        logging_steps=tc.logging_steps,
        remove_unused_columns=False,
        report_to="none",
        label_names=["labels"],
        prediction_loss_only=True,
        dataloader_num_workers=0,
        # transformers refuses bf16 without a GPU unless told the process is a CPU one (accelerate
        # then runs the CPU bf16 autocast)
        use_cpu=on_cpu,
    )
