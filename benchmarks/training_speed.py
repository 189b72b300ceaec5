"""The product's training step against torch's own forward and backward on the same batch, in one run.

    python benchmarks/training_speed.py [--model builtin:smollm2-135m-instruct] [--steps 4] [--batch 4]
        [--max-length 512] [--only torch-frozen-bf16,lora-bf16,...] [--env-variant KEY=VALUE[,KEY=VALUE] ...]

Every configuration runs in its own process (its peak resident memory is that process's
`ru_maxrss`), on the first batches of the same packed shards (the embedded dataset through the
model's chat template, `plan_adapter`'s data stages; a GGUF base is converted once into --store):

- `torch-frozen-<precision>`: the model alone (the base resized to the tokenizer, as trained),
  weights frozen, input embeddings requiring grad (what LoRA's backward needs): `model(...).loss`
  (the model's own loss, full logits) and `.backward()`. The baseline of LoRA.
- `torch-lora-<precision>`: the same with the product's peft LoRA model (no optimizer, no Trainer):
  what the LoRA matmuls cost.
- `torch-full-<precision>`: every weight requiring grad: the baseline of a full fine-tune.
- `lora-<precision>`, `full-<precision>` (+ `-checkpointing`, `-own-loss`): the product's training
  step (`run_training`, Trainer, chunked loss, MLflow logging every step), timed by callbacks:
  forward + backward (with gradient clipping), optimizer step, and the rest until the next step
  (scheduler, zero_grad, logging, reporting, the next batch).

`--env-variant` runs every configuration again with those environment variables (each variant a
process of its own, e.g. `MALLOC_MMAP_THRESHOLD_=4194304`: glibc reads it when the process starts),
shown as `<configuration>@<variant>` with its tokens/s and peak against the same configuration's
default run.

bf16 is autocast (`torch.autocast("cpu", bfloat16)`, as accelerate runs it). The first step of each
is a warm-up and not counted. tokens/s counts real tokens (padding excluded). Ratios are read
within one run: other work on the machine moves absolute figures (the load is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.core.config import experiment_from_dict  # noqa: E402

TORCH = [f"torch-{kind}-{precision}" for precision in ("fp32", "bf16") for kind in ("frozen", "lora", "full")]
PRODUCT = ["lora-fp32", "lora-bf16", "full-fp32", "full-bf16", "lora-bf16-checkpointing", "lora-bf16-own-loss"]
BASELINE = {"lora": "torch-frozen", "full": "torch-full"}


def experiment(args, mode: str, base_dir: Path, **training):
    return experiment_from_dict({
        "name": f"speed_{mode}", "store": args.store,
        "data": {"source": {"builtin": "default", "rows": args.rows}, "max_length": args.max_length},
        "model": {"base": args.model},
        "training": {"mode": mode, "max_steps": args.steps, "per_device_train_batch_size": args.batch,
                     "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "accuracy_rows": 0,
                     "sample_generations": 0, "seed": args.seed, **training},
        "tracking": {"mlflow_tracking_uri": f"sqlite:///{base_dir / 'mlflow.db'}"},
    }, base_dir=base_dir)


def product_settings(name: str) -> tuple[str, dict]:
    mode, precision, *extra = name.split("-", 2)
    # checkpointing only where the name says so (it is on by default): the step against torch's own
    training = {"precision": precision, "gradient_checkpointing": extra == ["checkpointing"]}
    if extra == ["own-loss"]:
        training["loss_chunk_tokens"] = 0
    return mode, training


def planned_and_base(exp):
    """The training spec (the data stages run, or cache hits) and the base model, converted once."""
    from transformers import AutoTokenizer

    from trainer.core.template_setup import load_template_setup
    from trainer.training.base_model import resolve_base_model
    from trainer.training.launch import plan_adapter
    from trainer.training.model_setup import base_vocab_size

    spec = plan_adapter(exp).spec
    added = load_template_setup(spec.tokenizer_dir).added_tokens
    vocab = base_vocab_size(AutoTokenizer.from_pretrained(str(spec.tokenizer_dir)), added)
    return spec, spec.base_model or resolve_base_model(exp.model, exp.store_root, vocab, exp.base_dir)


# -- in the child process -------------------------------------------------------------------------
def run_torch(args, name: str, tmp: Path) -> dict:
    """Forward + backward of the model alone on the batches the product trains on first."""
    import torch
    from transformers import AutoTokenizer

    from trainer.core.template_setup import load_template_setup
    from trainer.training.collate import PackedCollator, PackedDataset, model_inputs
    from trainer.training.model_setup import build_trainable_model
    from trainer.training.reporting import Reporter

    _, kind, precision = name.split("-")
    exp = experiment(args, "lora" if kind == "lora" else "full", tmp)
    spec, base = planned_and_base(exp)
    tokenizer = AutoTokenizer.from_pretrained(str(spec.tokenizer_dir))
    with Reporter(False) as reporter:
        model = build_trainable_model(exp, tokenizer, base, load_template_setup(spec.tokenizer_dir).added_tokens,
                                      reporter, torch.device("cpu")).model
    model.train()
    if kind == "frozen":
        model.requires_grad_(False)
    rows = PackedDataset(spec.train_shards)
    collate = PackedCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    embed = model.get_input_embeddings()
    times, cpu_times, tokens = [], [], 0
    for step in range(args.steps):
        batch = collate([rows[i] for i in range(step * args.batch, (step + 1) * args.batch)])
        inputs = model_inputs(batch, model)
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if kind == "frozen":
                embeds = embed(inputs.pop("input_ids")).detach().requires_grad_()
                loss = model(inputs_embeds=embeds, **inputs).loss
            else:
                loss = model(**inputs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
            tokens += int(batch["row_length"].sum())
    return {"step_seconds": [round(t, 2) for t in times], "tokens_per_second": tokens / sum(times),
            "best_step_tokens_per_second": tokens / len(times) / min(times),
            "tokens_per_cpu_second": tokens / sum(cpu_times)}


def run_product(args, name: str, tmp: Path) -> dict:
    """`run_training` as the product runs it, its steps timed by callbacks."""
    from transformers import TrainerCallback

    import trainer.training.train as train_module
    from trainer.training.launch import plan_adapter

    marks: list[tuple[str, float]] = []
    cpu_marks: list[float] = []  # process CPU time at each step's beginning

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append(("begin", time.perf_counter()))
            cpu_marks.append(time.process_time())

        def on_pre_optimizer_step(self, *a, **k):
            marks.append(("forward_backward", time.perf_counter()))

        def on_optimizer_step(self, *a, **k):
            marks.append(("optimizer", time.perf_counter()))

        def on_train_end(self, *a, **k):
            self.on_step_begin()

    class TimedTrainer(train_module.PackedTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(StepTimes())

    train_module.PackedTrainer = TimedTrainer
    mode, training = product_settings(name)
    exp = experiment(args, mode, tmp, **training)
    spec = json.loads(plan_adapter(exp).spec_path.read_text())
    spec["output_dir"] = str(tmp / name)  # the adapter is keyed: a fresh output, never a cache hit
    summary = train_module.run_training(spec)
    steps = []  # [forward_backward, optimizer, rest] per step
    begins = [i for i, (what, _) in enumerate(marks) if what == "begin"]
    for a, b in zip(begins, begins[1:]):
        t = dict(marks[a + 1:b])
        steps.append([t["forward_backward"] - marks[a][1], t["optimizer"] - t["forward_backward"],
                      marks[b][1] - t["optimizer"]])
    timed = steps[1:]
    seconds = sum(sum(s) for s in timed)
    tokens = summary.tokens * len(timed) / summary.global_step  # rows are packed full: ~equal per step
    return {"step_seconds": [round(sum(s), 2) for s in timed], "tokens_per_second": tokens / seconds,
            "best_step_tokens_per_second": tokens / len(timed) / min(sum(s) for s in timed),
            "tokens_per_cpu_second": tokens / (cpu_marks[-1] - cpu_marks[1]),
            "parts_seconds": {k: statistics.mean(s[i] for s in timed)
                              for i, k in enumerate(("forward_backward", "optimizer", "rest"))},
            "precision": summary.precision}


def child(args) -> None:
    with tempfile.TemporaryDirectory(prefix="sftdag-speed-") as tmp:
        run = run_torch if args.child.startswith("torch-") else run_product
        result = run(args, args.child, Path(tmp))
    result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent ----------------------------------------------------------------------------------
def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="per configuration, the first a warm-up")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    parser.add_argument("--store", default=str(REPO / ".sftdag" / "store"),
                        help="where the data stages and the converted model are cached")
    parser.add_argument("--env-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="run each configuration again with these environment variables (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    from trainer.core.config import TrainingConfig

    names = [n for n in args.only.split(",") if n] or TORCH + PRODUCT
    try:
        variants = {v: dict(pair.split("=", 1) for pair in v.split(",")) for v in args.env_variant}
    except ValueError:
        sys.exit(f"--env-variant: KEY=VALUE[,KEY=VALUE] expected, got {args.env_variant}")
    runs = [(name, None) for name in names] + [(name, v) for v in variants for name in names]
    with tempfile.TemporaryDirectory(prefix="sftdag-speed-") as tmp:
        planned_and_base(experiment(args, "lora", Path(tmp)))  # data stages and conversion, not timed
    print(f"load average before: {load()}", flush=True)
    results = {}
    for name, variant in runs:
        label = f"{name}@{variant}" if variant else name
        command = [sys.executable, __file__, "--child", name, *(argv if argv is not None else sys.argv[1:])]
        env = {**os.environ, "TQDM_DISABLE": "1", **(variants[variant] if variant else {})}
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
        results[label] = r = json.loads(lines[-1][len("RESULT "):])
        if variant:  # against the same configuration's run in the default environment, this run
            r["over_default_env"] = round(r["tokens_per_second"] / results[name]["tokens_per_second"], 2)
            r["peak_over_default_env"] = round(r["max_rss_gb"] / results[name]["max_rss_gb"], 2)
        print(f"{label}: {r['tokens_per_second']:.0f} tokens/s ({r['tokens_per_cpu_second']:.0f} per CPU-second), "
              f"peak RSS {r['max_rss_gb']:.2f} GB"
              + (f", {', '.join(f'{k} {v:.2f} s' for k, v in r['parts_seconds'].items())}" if "parts_seconds" in r
                 else ""), flush=True)
    for label, r in results.items():
        name = label.split("@")[0]
        mode, training = (name.split("-")[0], {}) if name.startswith("torch-") else product_settings(name)
        baseline = results.get(f"{BASELINE.get(mode, '')}-{training.get('precision', '')}")
        if baseline:
            r["over_torch"] = round(r["tokens_per_second"] / baseline["tokens_per_second"], 2)
            r["over_torch_cpu_time"] = round(r["tokens_per_cpu_second"] / baseline["tokens_per_cpu_second"], 2)
            r["over_torch_best_step"] = round(r["best_step_tokens_per_second"]
                                              / baseline["best_step_tokens_per_second"], 2)
    print(json.dumps({
        "model": args.model, "threads": torch.get_num_threads(), "steps_timed": args.steps - 1,
        "batch_rows": args.batch, "max_length": args.max_length, "auto_precision": TrainingConfig().resolved_precision(),
        "load_average_after": load(), **results}, indent=1))


if __name__ == "__main__":
    main()
