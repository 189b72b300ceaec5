"""Data preparation at scale (issue 16): memory vs rows, speed vs raw batch tokenization, and
re-preparation after an append, each as a ratio against a baseline measured in the same run.

    python benchmarks/prepare_scale.py [--data ../shared/data] [--parts a,b,c] [--small 200000]
        [--large 2000000] [--inc-rows 1000000] [--append 0.01] [--b-num-proc 1,2] [--rss-limit-gb 16]
        [--keep-dir]

Rows: one-turn conversations from GSM8K train + both CodeAlpaca files (as benchmarks/prepare.py),
repeated, row i's question prefixed with "#i " so that no two rows are equal; streamed to JSONL.
Every preparation is the real CLI, `.venv/bin/sftdag prepare --verbose EXP.yaml`, in a subprocess
with its own DAGSTER_HOME and store (Llama-3 tokenizer, max_length 2048, BFD packing),
HF_HUB_OFFLINE=1. The RSS of its whole process tree (the CLI and all its children, summed; pages
shared between processes count once per process) is sampled every 0.1 s.
  a. peak tree RSS, peak RSS of the largest single process and wall time on --small and --large
     rows (data.num_proc left out: the cores): targets peak(large)/peak(small) <= 1.5, peak(large)
     < 4 GB, time growing linearly with rows.
  b. on the --small rows: the Llama-3 tokenizer's batch call over the rendered conversations (the
     baseline; rendering not timed, batches of 10,000; beside it, for reference, the tiktoken twin
     that the preparation encodes with, on one thread, over the same texts) against `sftdag prepare` with data.num_proc
     1 and 2 (--b-num-proc), each into an empty store, and the same preparation without Dagster
     (`DataPipeline(exp).run()` in a fresh process, num_proc 2: the whole process, and its run() alone:
     the Python start-up, the imports and the experiment's loading excluded), which says what the
     command adds, with the wall seconds of each stage of that run(). "x raw" is a rows/s
     ratio (same rows: raw seconds / prepare seconds); tokens/s is shown too (prepare: the
     summary's packed tokens). Targets: >= 0.9x raw with 2 processes, 2 processes faster than 1.
  c. --inc-rows rows prepared (T_full); --append x that many rows appended to the end of the same
     file; prepared again into the same store and Dagster home (T_inc). Target: T_inc/T_full < 0.10.
A preparation whose tree passes --rss-limit-gb is killed (the machine is shared) and shown as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GB = 1024 ** 3
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.0f}s] {msg}", flush=True)


def base_pairs(data_dir: Path) -> list[tuple[str, str]]:
    pairs = []
    with open(data_dir / "gsm8k_train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            pairs.append((f"Question: {r['question']}\nAnswer:", r["answer"]))
    for name in ("code_alpaca_2k.json", "new_codealpaca.json"):
        for r in json.loads((data_dir / name).read_text()):
            prompt = r["instruction"] + (f"\n\nInput:\n{r['input']}" if r.get("input") else "")
            pairs.append((f"{prompt}\n\nResponse:", r["output"].strip()))
    return pairs


def conversation(pairs: list[tuple[str, str]], i: int) -> dict:
    prompt, answer = pairs[i % len(pairs)]
    return {"messages": [{"role": "user", "content": f"#{i} {prompt}"}, {"role": "assistant", "content": answer}]}


def write_rows(path: Path, pairs, start: int, count: int, mode: str = "w") -> None:
    with open(path, mode) as f:  # line by line: never all rows in memory
        for i in range(start, start + count):
            f.write(json.dumps(conversation(pairs, i)) + "\n")


def experiment(run_dir: Path, data_file: Path, num_proc: int | None) -> Path:
    import yaml

    data = {"source": {"path": str(data_file)}, "max_length": 2048, "packing": "bfd"}
    if num_proc is not None:
        data["num_proc"] = num_proc
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "prepare_scale", "store": "store", "data": data,
                                    "tokenizer": {"path": "builtin:llama3"}}, sort_keys=False))
    return path


def tree_rss(proc: psutil.Process) -> list[int]:
    sizes = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:  # exited between the listing and the read
            pass
    return sizes


def prepare(exp_yaml: Path, label: str, rss_limit: float) -> dict:
    """One `sftdag prepare` with its process tree's RSS sampled; returns seconds, peaks, summary."""
    run_dir = exp_yaml.parent
    env = {**os.environ, "DAGSTER_HOME": str(run_dir / "dagster_home"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    log(f"{label}: sftdag prepare {exp_yaml}")
    peak_tree = peak_proc = 0
    killed = False
    with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
        start = time.perf_counter()
        # --verbose: Dagster's log on stderr says which stages were built and which were cache hits.
        popen = subprocess.Popen([str(REPO / ".venv/bin/sftdag"), "prepare", "--verbose", str(exp_yaml)],
                                 cwd=run_dir, env=env, stdout=out, stderr=err)
        proc, next_report = psutil.Process(popen.pid), start + 60
        while popen.poll() is None:
            try:
                sizes = tree_rss(proc)
            except psutil.Error:
                sizes = []
            peak_tree, peak_proc = max(peak_tree, sum(sizes)), max(peak_proc, max(sizes, default=0))
            if sum(sizes) > rss_limit and not killed:
                log(f"{label}: tree RSS {sum(sizes) / GB:.1f} GB over --rss-limit-gb: killing it")
                for p in [*proc.children(recursive=True), proc]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                killed = True
            if time.perf_counter() > next_report:
                log(f"{label}: {time.perf_counter() - start:.0f} s, {len(sizes)} processes, tree RSS "
                    f"{sum(sizes) / GB:.2f} GB (peak {peak_tree / GB:.2f} GB)")
                next_report += 60
            time.sleep(0.1)
        seconds = time.perf_counter() - start
    result = {"label": label, "seconds": seconds, "peak_tree": peak_tree, "peak_proc": peak_proc,
              "rc": popen.returncode, "killed": killed, "summary": None}
    # What the run's log says each stage did ("raw/train: built …", "…: cache hit …").
    for name, done in re.findall(r" - (\S+): (cache hit|built) ", (run_dir / "stderr.txt").read_text()):
        result.setdefault(done, []).append(name)
    lines = (run_dir / "stdout.txt").read_text().strip().splitlines()
    if popen.returncode == 0 and lines:
        result["summary"] = json.loads(lines[-1])
        log(f"{label}: {seconds:.1f} s, peak tree RSS {peak_tree / GB:.2f} GB, largest process "
            f"{peak_proc / GB:.2f} GB, rows_in {result['summary']['rows_in']}, tokens {result['summary']['tokens']}")
    else:
        tail = (run_dir / "stderr.txt").read_text().strip().splitlines()[-1:]
        log(f"{label}: FAILED rc {popen.returncode}{' (killed: RSS limit)' if killed else ''} after "
            f"{seconds:.1f} s, peak tree RSS {peak_tree / GB:.2f} GB: {tail[0] if tail else ''}")
    return result


# The preparation without Dagster or the CLI, in a fresh process: prints the seconds of its
# imports and experiment loading, then of DataPipeline.run() (tokenizer load and workers included),
# and where the run's time went: each stage's wall seconds (the sharded stages across the workers;
# the tokenizer's loading and the packing in this process).
IN_PROCESS = r"""
import json, sys, time
start = time.perf_counter()
from trainer.core import store
from trainer.core.config import load_experiment
from trainer.data import parallel
from trainer.data.prepare import DataPipeline
stages = {}
def timing(method, name_of):
    def timed(self, stage, *args):
        t = time.perf_counter()
        try:
            return method(self, stage, *args)
        finally:
            name = name_of(stage, args)
            if name:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
    return timed
parallel.ShardBuilder.build = timing(parallel.ShardBuilder.build, lambda stage, args: args[1])  # (tasks, what)
store.Store.get_or_build = timing(store.Store.get_or_build,
                                  lambda stage, args: stage if stage in ("tokenizer", "packed") else None)
exp = load_experiment(sys.argv[1])
begun = time.perf_counter()
outputs = DataPipeline(exp, progress=False).run()
print(json.dumps({"imports": begun - start, "run": time.perf_counter() - begun, "stages": stages,
                  "tokens": outputs["packed/train"].manifest["counts"]["tokens"]}))
"""


def prepare_in_process(exp_yaml: Path, label: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log(f"{label}: DataPipeline.run() in a fresh process")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", IN_PROCESS, str(exp_yaml)], cwd=exp_yaml.parent, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        log(f"{label}: FAILED rc {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        return {"seconds": seconds, "run": None}
    result = {"seconds": seconds, **json.loads(done.stdout.strip().splitlines()[-1])}
    log(f"{label}: {seconds:.1f} s, of which run {result['run']:.1f} s, imports {result['imports']:.1f} s; "
        "stages: " + ", ".join(f"{what} {s:.1f} s" for what, s in result["stages"].items()))
    return result


def raw_baseline(pairs, rows: int, batch: int = 10_000) -> tuple[float, int, float, float]:
    """Seconds and tokens of the Llama-3 tokenizer's batch call over the rendered conversations, the
    seconds of its tiktoken twin (what the preparation encodes with) over the same texts, one
    thread, checked to give the same ids, and the seconds building the twin took (once a worker)."""
    from trainer.core.config import TokenizerConfig
    from trainer.data.tiktoken_twin import tiktoken_twin
    from trainer.data.tokenizer_loading import load_tokenizer

    tok = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    t = time.perf_counter()
    twin = tiktoken_twin(tok)
    build_seconds = time.perf_counter() - t
    seconds, tokens, twin_seconds = 0.0, 0, 0.0
    for start in range(0, rows, batch):
        texts = [tok.apply_chat_template(conversation(pairs, i)["messages"], tokenize=False)
                 for i in range(start, min(rows, start + batch))]
        t = time.perf_counter()
        ids = tok(texts, add_special_tokens=False)["input_ids"]  # the rendering already has <|begin_of_text|>
        seconds += time.perf_counter() - t
        tokens += sum(map(len, ids))
        t = time.perf_counter()
        twin_ids = twin.encode_batch(texts)
        twin_seconds += time.perf_counter() - t
        assert twin_ids == ids
    return seconds, tokens, twin_seconds, build_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data")
    parser.add_argument("--parts", default="a,b,c", help="which of a (memory), b (speed), c (incremental)")
    parser.add_argument("--small", type=int, default=200_000, help="N1 rows (parts a, b)")
    parser.add_argument("--large", type=int, default=2_000_000, help="N2 rows (part a)")
    parser.add_argument("--inc-rows", type=int, default=1_000_000, help="rows before the append (part c)")
    parser.add_argument("--append", type=float, default=0.01, help="fraction of --inc-rows appended (part c)")
    parser.add_argument("--b-num-proc", default="1,2", help="data.num_proc values of `sftdag prepare` in part b")
    parser.add_argument("--rss-limit-gb", type=float, default=16.0, help="kill a preparation whose tree passes this")
    parser.add_argument("--keep-dir", action="store_true", help="keep the data files, stores and logs")
    args = parser.parse_args()
    parts, limit = set(args.parts.split(",")), args.rss_limit_gb * GB

    pairs = base_pairs(args.data)
    work = Path(tempfile.mkdtemp(prefix="prepare_scale-"))
    log(f"work dir {work}; cores {os.cpu_count()}; parts {sorted(parts)}; {len(pairs)} distinct base rows")
    files: dict[int, Path] = {}

    def rows_file(n: int) -> Path:
        if n not in files:
            log(f"writing {n} rows")
            files[n] = work / f"rows-{n}.jsonl"
            write_rows(files[n], pairs, 0, n)
        return files[n]

    table, verdicts = [], []  # (part, what, rows, seconds, peak tree, peak proc, tokens/s, ratio)

    def add(part: str, what: str, rows: int, r: dict, tps: float | None = None, ratio: float | None = None) -> None:
        status = "" if r["summary"] else " (KILLED)" if r["killed"] else " (FAILED)"
        table.append((part, what + status, rows, r["seconds"], r["peak_tree"], r["peak_proc"], tps, ratio))

    def caveat(*runs: dict) -> str:
        return "" if all(r["summary"] for r in runs) else "  [a run failed: figures up to its end]"

    try:
        if "a" in parts:
            a1, a2 = (prepare(experiment(work / f"a-{n}", rows_file(n), None), f"a: {n} rows", limit)
                      for n in (args.small, args.large))
            add("a", "prepare, num_proc default", args.small, a1)
            add("a", "prepare, num_proc default", args.large, a2)
            mem, grow = a2["peak_tree"] / a1["peak_tree"], a2["seconds"] / a1["seconds"]
            verdicts.append(f"a  peak tree RSS N2/N1 = {mem:.2f} (target <= 1.5); N2 peak {a2['peak_tree'] / GB:.2f} "
                            f"GB (target < 4), largest process {a2['peak_proc'] / GB:.2f} GB{caveat(a1, a2)}")
            verdicts.append(f"a  time N2/N1 = {grow:.2f} for rows N2/N1 = {args.large / args.small:.2f} "
                            f"(linear: time per row x{grow * args.small / args.large:.2f}){caveat(a1, a2)}")
        if "b" in parts:
            data_file = rows_file(args.small)
            log(f"b: raw batch tokenization of {args.small} rendered conversations")
            raw_s, raw_tokens, twin_s, twin_build_s = raw_baseline(pairs, args.small)
            log(f"b: raw {raw_s:.1f} s, {raw_tokens} tokens; the tiktoken twin {twin_s:.1f} s")
            verdicts.append(f"b  building the tiktoken twin (once per worker): {twin_build_s:.2f} s")
            table.append(("b", "raw batch tokenization (baseline)", args.small, raw_s, None, None,
                          raw_tokens / raw_s, 1.0))
            table.append(("b", "the same, tiktoken twin, 1 thread", args.small, twin_s, None, None,
                          raw_tokens / twin_s, raw_s / twin_s))
            runs = {n: prepare(experiment(work / f"b-proc{n}", data_file, n), f"b: num_proc {n}", limit)
                    for n in map(int, args.b_num_proc.split(","))}
            for n, r in runs.items():
                add("b", f"prepare, num_proc {n}", args.small, r,
                    r["summary"]["tokens"] / r["seconds"] if r["summary"] else None, raw_s / r["seconds"])
            alone = prepare_in_process(experiment(work / "b-in-process", data_file, 2), "b: no Dagster, num_proc 2")
            if alone["run"] is not None:
                table.append(("b", "no Dagster, num_proc 2: the process", args.small, alone["seconds"], None, None,
                              alone["tokens"] / alone["seconds"], raw_s / alone["seconds"]))
                table.append(("b", "no Dagster, num_proc 2: run() alone", args.small, alone["run"], None, None,
                              alone["tokens"] / alone["run"], raw_s / alone["run"]))
            ratios = ", ".join(f"num_proc {n}: {raw_s / r['seconds']:.2f}" for n, r in runs.items())
            verdicts.append(f"b  x raw (rows/s) {ratios} (target >= 0.9 with 2)"
                            + (f"; 2-proc/1-proc speedup {runs[1]['seconds'] / runs[2]['seconds']:.2f} (target > 1)"
                               if {1, 2} <= set(runs) else "") + caveat(*runs.values()))
            if alone["run"] is not None:
                other = alone["run"] - sum(alone["stages"].values())
                verdicts.append("b  where run() spent its time (wall s): " + ", ".join(
                    f"{what} {s:.1f}" for what, s in alone["stages"].items())
                    + f", the rest {other:.1f} (loading the tokenizer for its identity, planning the shards)")
            if 2 in runs and alone["run"] is not None:
                verdicts.append(f"b  `sftdag prepare` - the same preparation in a fresh process without Dagster: "
                                f"{runs[2]['seconds'] - alone['seconds']:+.1f} s; that process - its run(): "
                                f"{alone['seconds'] - alone['run']:.1f} s (Python, imports, loading the experiment)")
        if "c" in parts:
            extra = round(args.inc_rows * args.append)
            data_file = work / "c" / "rows.jsonl"
            data_file.parent.mkdir()
            shutil.copy(rows_file(args.inc_rows), data_file)
            exp_yaml = experiment(work / "c", data_file, None)
            full = prepare(exp_yaml, f"c: full, {args.inc_rows} rows", limit)
            log(f"c: appending {extra} rows to the end of {data_file}")
            write_rows(data_file, pairs, args.inc_rows, extra, mode="a")
            inc = prepare(exp_yaml, f"c: after appending {extra} rows", limit)
            add("c", "full preparation", args.inc_rows, full, ratio=1.0)
            add("c", f"after appending {args.append:.0%}", args.inc_rows + extra, inc,
                ratio=inc["seconds"] / full["seconds"])
            hits = inc["summary"]["cache_hits"] if inc["summary"] else "(failed)"
            verdicts.append(f"c  T_inc/T_full = {inc['seconds'] / full['seconds']:.3f} (target < 0.10)"
                            f"{caveat(full, inc)}; after the append, the summary's cache_hits: {hits}; "
                            f"the run log: built {inc.get('built', [])}, cache hit {inc.get('cache hit', [])}")
    finally:
        if args.keep_dir:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    gb = lambda v: f"{v / GB:.2f}" if v else ""  # noqa: E731
    print(f"\nprepare_scale: cores {os.cpu_count()}, Llama-3 tokenizer, max_length 2048, BFD; "
          f"RSS sampled every 0.1 s over the process tree")
    print(f"{'':<3}{'run':<40}{'rows':>10}{'seconds':>10}{'tree GB':>9}{'proc GB':>9}{'tokens/s':>11}{'ratio':>8}")
    for part, what, rows, secs, tree, single, tps, ratio in table:
        print(f"{part:<3}{what:<40}{rows:>10}{secs:>10.1f}{gb(tree):>9}{gb(single):>9}"
              f"{f'{tps:,.0f}' if tps else '':>11}{f'{ratio:.3f}' if ratio is not None else '':>8}")
    print("ratio: b = raw seconds / prepare seconds on the same rows (rows/s), c = seconds / full seconds")
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
