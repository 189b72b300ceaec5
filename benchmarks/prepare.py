"""Data preparation throughput, as ratios against raw batch tokenization measured in the same run.

    python benchmarks/prepare.py --data ../shared/data [--rows 48000] [--max-length 2048] [--format messages]
        [--num-proc 1,2]

On the same prompt/completion rows (GSM8K train + both CodeAlpaca files, repeated to --rows),
with the Llama-3 tokenizer:
  1. raw batch tokenization of prompt+completion text (the baseline: nothing else);
  2. sftdag's full preparation (load, template, tokenize with completion masks, BFD pack,
     write Arrow shards) into an empty store, in this process (no Dagster), once per --num-proc
     (data.num_proc: processes building the source's shards; each run starts its own workers);
  3. a second experiment over the same data settings (every stage a cache hit);
  4. TRL SFTTrainer's preparation of the same rows (tokenize, completion masks, BFD packing),
     when `trl` is installed.
With --format messages the same rows are one-turn conversations under the Llama-3 chat template
(assistant-only masks); the baseline then tokenizes the rendered conversations (rendering not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.core.config import experiment_from_dict  # noqa: E402
from trainer.data.parallel import close_pools  # noqa: E402
from trainer.data.prepare import DataPipeline  # noqa: E402
from trainer.data.stages import clear_tokenizers  # noqa: E402


def as_conversation(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["completion"].strip()}]}


def load_rows(data_dir: Path, rows: int) -> list[dict]:
    base = []
    with open(data_dir / "gsm8k_train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            base.append({"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]})
    for name in ("code_alpaca_2k.json", "new_codealpaca.json"):
        for r in json.loads((data_dir / name).read_text()):
            prompt = r["instruction"] + (f"\n\nInput:\n{r['input']}" if r.get("input") else "")
            base.append({"prompt": f"{prompt}\n\nResponse:", "completion": " " + r["output"]})
    return [base[i % len(base)] for i in range(rows)]


def experiment(name: str, data_file: Path, store: Path, max_length: int, num_proc: int | None = None):
    return experiment_from_dict({
        "name": name, "store": str(store),
        "data": {"source": {"path": str(data_file)}, "max_length": max_length, "packing": "bfd",
                 "num_proc": num_proc},
        "tokenizer": {"path": "builtin:llama3"},
    })


def bench_raw(tokenizer, rows) -> tuple[float, int]:
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) if "messages" in r
             else r["prompt"] + r["completion"] for r in rows]
    start = time.perf_counter()
    encodings = tokenizer(texts, add_special_tokens=True)["input_ids"]
    elapsed = time.perf_counter() - start
    return elapsed, sum(map(len, encodings))


def bench_trl(rows, max_length: int) -> tuple[float, int, float] | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()

    from trainer.core.config import TokenizerConfig
    from trainer.data.tokenizer_loading import load_tokenizer

    tok = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    tok.pad_token = tok.eos_token  # TRL's usual set-up; this tokenizer.json has no pad token
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    ds = datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, packing=True, packing_strategy="bfd", max_length=max_length,
                         completion_only_loss=True, report_to=[], dataset_num_proc=None, bf16=False, use_cpu=True)
        start = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        elapsed = time.perf_counter() - start
    packed = trainer.train_dataset
    tokens = sum(len(x) for x in packed["input_ids"])
    efficiency = tokens / (len(packed) * max_length)
    return elapsed, tokens, efficiency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--rows", type=int, default=48000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--format", choices=["prompt_completion", "messages"], default="prompt_completion")
    parser.add_argument("--num-proc", default="1,2", help="data.num_proc values to time, comma-separated")
    args = parser.parse_args()

    rows = load_rows(args.data, args.rows)
    if args.format == "messages":
        rows = [as_conversation(r) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_file = tmp / "rows.jsonl"
        with open(data_file, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        first = experiment("bench_a", data_file, tmp / "store", args.max_length)
        tokenizer = DataPipeline(first, progress=False).tokenizer_bundle.tokenizer
        raw_s, raw_tokens = bench_raw(tokenizer, rows)

        full = {}
        for num_proc in map(int, args.num_proc.split(",")):
            close_pools()  # each run starts its own workers
            exp = experiment("bench_a", data_file, tmp / f"store-{num_proc}", args.max_length, num_proc)
            start = time.perf_counter()
            outputs = DataPipeline(exp, progress=False).run()
            full[num_proc] = (time.perf_counter() - start, outputs)
        outputs = full[min(full)][1]
        counts = outputs["packed/train"].manifest["counts"]

        # A second experiment: other training settings, same data settings; new tokenizer load too.
        clear_tokenizers()
        second = experiment("bench_b", data_file, tmp / f"store-{min(full)}", args.max_length)
        second.training.learning_rate = 1e-5
        start = time.perf_counter()
        again = DataPipeline(second, progress=False).run()
        second_s = time.perf_counter() - start
        assert all(o.cache_hit for o in again.values()), "second experiment should be all cache hits"

    raw_tps = raw_tokens / raw_s
    print(f"format: {args.format}  rows: {len(rows)}  tokens: {counts['tokens']}  max_length: {args.max_length}  cores: {os.cpu_count()}")
    print(f"{'stage':<44}{'seconds':>9}{'tokens/s':>12}{'x raw':>8}{'packing':>9}")
    print(f"{'raw batch tokenization (baseline)':<44}{raw_s:>9.2f}{raw_tps:>12,.0f}{1.0:>8.2f}{'':>9}")
    for num_proc, (seconds, run_outputs) in full.items():
        tps = counts["tokens"] / seconds
        print(f"{f'sftdag full preparation, num_proc {num_proc}':<44}{seconds:>9.2f}{tps:>12,.0f}{tps / raw_tps:>8.2f}"
              f"{counts['packing_efficiency']:>9.2%}")
        stages = ", ".join(f"{name.split('/')[0]} {o.manifest['build_seconds']:.1f}s"
                           for name, o in run_outputs.items() if name == "tokenizer" or name.endswith("/train"))
        print(f"  by stage: {stages}")
    if len(full) > 1:
        print(f"  {max(full)} processes / 1: {full[min(full)][0] / full[max(full)][0]:.2f}x faster")
    print(f"{'second experiment, same data (cache hits)':<44}{second_s:>9.2f}", flush=True)
    trl_result = None if args.skip_trl or args.format != "prompt_completion" else bench_trl(rows, args.max_length)
    if trl_result:
        trl_s, trl_tokens, trl_eff = trl_result
        print(f"{'TRL SFTTrainer preparation':<44}{trl_s:>9.2f}{trl_tokens / trl_s:>12,.0f}"
              f"{trl_tokens / trl_s / raw_tps:>8.2f}{trl_eff:>9.2%}")


if __name__ == "__main__":
    main()
