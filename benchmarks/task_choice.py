"""What a pretrained model can already do on the embedded tasks, before any training: per task and
prompt style, greedy pass@1 and pass@k of k sampled answers (the task's own verifier, exact
answers), on held-out questions. A loop needs a start whose pass@1 is low but whose pass@k is
clearly above zero: the correct samples are what it trains on.

    python benchmarks/task_choice.py [--model builtin:smollm2-135m-instruct] [--prompts 24] [--samples 8]

Prompts are rendered as the pipeline renders held-out prompts (the model's chat template, its
generation prompt): `default` asks the question alone (some conversations have a system prompt,
some prompt/completion pairs are plain text), `few_shot` after two solved problems of the task.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--datasets", nargs="+", default=["default", "few_shot"])
    parser.add_argument("--prompts", type=int, default=24, help="held-out questions per task")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default=str(REPO / ".sftdag" / "store"), help="where a GGUF is converted")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.core.config import DataConfig, TemplateConfig
    from trainer.data import default_data
    from trainer.data.record_formats import normalize
    from trainer.data.templating import generation_prompt, setup_template
    from trainer.models.gguf import gguf_file, is_gguf_base
    from trainer.training.generate import SamplingSettings, sample

    path = args.model
    if is_gguf_base(path):
        from trainer.models.convert import converted

        path = str(converted(gguf_file(path), args.store).path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    setup = setup_template(tok, TemplateConfig())
    data = DataConfig()
    stops = [setup.eot_token] if setup.eot_token else []

    print(f"{args.model}: held-out questions, {args.prompts} per task; greedy pass@1, pass@{args.samples} "
          f"(T={args.temperature}) and the share of right samples\n")
    print(f"| prompts | task | greedy pass@1 | pass@{args.samples} | right samples | first greedy answers |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for dataset in args.datasets:
        by_task: dict[str, list[dict]] = defaultdict(list)
        for record in default_data.BUILTIN_DATASETS[dataset]("test", 40 * args.prompts, seed=args.seed):
            if len(by_task[record["task"]]) < args.prompts:
                by_task[record["task"]].append(record)
        for task in default_data.TASKS:
            records = by_task[task]
            prompts = [{"prompt_id": str(i), "prompt": generation_prompt(normalize(r, data), tok, setup, data).prompt}
                       for i, r in enumerate(records)]
            greedy = sample(model, tok, prompts, SamplingSettings(temperature=0.0, max_new_tokens=args.max_new_tokens,
                                                                  batch_size=32), stops)
            sampled = sample(model, tok, prompts, SamplingSettings(
                samples_per_prompt=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                seed=args.seed, batch_size=16), stops)

            def right(r) -> bool:
                return r.text.strip() == records[int(r.prompt_id)]["answer"]

            solved = {r.prompt_id for r in sampled if right(r)}
            print(f"| {dataset} | {task} | {sum(map(right, greedy)) / len(records):.2f} "
                  f"| {len(solved) / len(records):.2f} | {sum(map(right, sampled)) / len(sampled):.3f} "
                  f"| {'; '.join(repr(r.text) for r in greedy[:3])} |", flush=True)


if __name__ == "__main__":
    main()
