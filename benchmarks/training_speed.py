"""Training tokens per second on a real pretrained model, LoRA against a full fine-tune, in one run.

    python benchmarks/training_speed.py [--model builtin:smollm2-135m-instruct] [--steps 8] [--batch 8]

Both train through the product's own path (the data stages, `plan_adapter`, `run_training`) on
the same packed shards of the embedded dataset, templated by the model's own chat template; the
figure is the trainer's tokens (padding excluded) over its train runtime, and full / LoRA is the
ratio. A GGUF base is converted once into --store (not timed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.core.config import experiment_from_dict  # noqa: E402


def experiment(args, mode: str, store: str, base_dir: Path):
    return experiment_from_dict({
        "name": f"speed_{mode}", "store": store,
        "data": {"source": {"builtin": "default", "rows": args.rows}, "max_length": args.max_length},
        "model": {"base": args.model},
        "training": {"mode": mode, "max_steps": args.steps, "per_device_train_batch_size": args.batch,
                     "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "accuracy_rows": 0,
                     "sample_generations": 0, "seed": args.seed},
        "tracking": {"mlflow_tracking_uri": f"sqlite:///{base_dir / 'mlflow.db'}"},
    }, base_dir=base_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default=str(REPO / ".sftdag" / "store"),
                        help="where the data stages and the converted model are cached")
    args = parser.parse_args(argv)

    import torch

    from trainer.training.launch import plan_adapter
    from trainer.training.train import run_training

    results = {}
    with tempfile.TemporaryDirectory(prefix="sftdag-speed-") as tmp:
        for mode in ("lora", "full"):
            exp = experiment(args, mode, args.store, Path(tmp))
            plan = plan_adapter(exp)
            # A fresh output each run: the adapter is keyed, so a second run would be a cache hit.
            spec = json.loads(plan.spec_path.read_text())
            spec["output_dir"] = str(Path(tmp) / mode)
            summary = run_training(spec)
            results[mode] = {"tokens": summary.tokens, "trainable_tokens": summary.trainable_tokens,
                             "seconds": round(summary.train_runtime, 2),
                             "tokens_per_second": round(summary.tokens / summary.train_runtime, 1)}
    print(json.dumps({
        "model": args.model, "threads": torch.get_num_threads(), "steps": args.steps, "batch_rows": args.batch,
        "max_length": args.max_length, **results,
        "full_over_lora_speed": round(results["full"]["tokens_per_second"] / results["lora"]["tokens_per_second"], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
