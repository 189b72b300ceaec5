"""One round of the generate → filter → train loop, planned and built in order.

    prompts   the loop's prompt rows, through the data stages (raw → templated, as an eval split:
              the template's generation prompt for each, and its reference)
    samples   generation by the round's generator (round 0: the starting model; round r: round
              r-1's merged model), in its own process (`python -m trainer.loop.sample`)
    accepted  the samples the filters keep, as training rows (this round's, or all rounds' so far,
              plus `loop.training.replay` of SFT rows), and preference pairs of the same samples
    packed    the accepted rows through the data stages (raw → packed), like any training data
    adapter   trained on the starting model (fresh, as STaR and ReST-EM do) or continuing the
              previous round's adapter (`python -m trainer.training.train`)
    eval      the adapter merged into the starting model (`python -m trainer.training.merge`): the
              next round's generator; it and the starting model scored on the experiment's held-out
              prompts by its scorers (`python -m trainer.training.score`)

Every output is in the content-addressed store, keyed by its inputs' keys and its own settings
(`trainer.core.keys`), so a round run again is a cache hit. Nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from trainer.core import keys
from trainer.core.config import EvalConfig, Experiment, FieldNames, SourceConfig
from trainer.core.process_step import ProcessStep
from trainer.core.schemas import HELD_OUT
from trainer.core.store import StageOutput, Store
from trainer.core.template_setup import load_template_setup
from trainer.data.record_formats import Example, RowError, asked_of, load_formatting_func, normalize
from trainer.data.prepare import DataPipeline
from trainer.data.stages import read_rows
from trainer.data.sources import check_held_out_files
from trainer.core.user_code import resolve_function
from trainer.loop.filters import CORRECTNESS_FILTERS, FilterResult, build_pipeline
from trainer.training.generate import SamplingSettings, read_samples
from trainer.loop.sample import SamplingSpec
from trainer.loop.settings import LoopConfig

ACCEPTED_ROWS = "train.jsonl"  # the round's training rows: a data source like any other
REJECTED_ROWS = "rejected.jsonl"
# Preference pairs (TRL's format): an accepted and a wrongly answered sample of a prompt; one file
# per form, as DPOTrainer takes a dataset of one: conversational (messages prompts), standard (string prompts).
PAIRS = "pairs.jsonl"
TEXT_PAIRS = "pairs_text.jsonl"
REPLAYED_ROWS = "replayed.jsonl"  # the SFT rows replayed: {"row_id": in the raw train split, "line": in train.jsonl}
REPLAY_REJECTED_ROWS = "replay_rejected.jsonl"  # SFT rows drawn but unusable: {"row_id", "reason"}


def prompt_pipeline(exp: Experiment, cfg: LoopConfig, store: Store) -> DataPipeline:
    """The data stages over the loop's prompts: the prompt source is the eval split, so its
    templated output holds each row's generation prompt (`held_out.jsonl`)."""
    data = dataclasses.replace(exp.data, eval=EvalConfig(source=cfg.prompts.source, fraction=0.0, pack=False))
    return DataPipeline(dataclasses.replace(exp, data=data), store=store, progress=False, eval_held_out=False)


def build_prompts(exp: Experiment, cfg: LoopConfig, tokenizer: StageOutput) -> dict[str, StageOutput]:
    """{"raw": …, "templated": …} of the loop's prompts (cache hits once built). Prompts read from a
    file of the held-out source would train the rounds on what they are scored on: refused."""
    if exp.data.eval.source is not None:
        check_held_out_files(cfg.prompts.source, exp.data.eval.source, exp.base_dir)
    pipeline = prompt_pipeline(exp, cfg, Store(exp.store_root))
    raw = pipeline.raw("eval")
    return {"raw": raw, "templated": pipeline.templated("eval", raw, tokenizer)}


def plan_samples(exp: Experiment, cfg: LoopConfig, round_index: int, generator: StageOutput,
                 tokenizer: StageOutput, prompts: StageOutput) -> ProcessStep:
    """The round's samples of every prompt by `generator`: `python -m trainer.loop.sample SPEC`."""
    g = cfg.generation
    settings = SamplingSettings(samples_per_prompt=g.samples_per_prompt, temperature=g.temperature, top_p=g.top_p,
                                max_new_tokens=g.max_new_tokens, seed=g.seed + round_index)
    eot = load_template_setup(tokenizer.path).eot_token
    stops = [eot] if eot else []
    store = Store(exp.store_root)
    key = store.key("samples", {"generator": generator.key, "prompts": prompts.key},
                    keys.samples_params(round_index, dataclasses.asdict(settings), stops))
    spec = SamplingSpec(model_dir=generator.path, tokenizer_dir=tokenizer.path,
                        prompts=prompts.path / HELD_OUT, settings=settings, stop_tokens=stops,
                        out_dir=store.path("samples", key), round_index=round_index, generator_version=generator.key)
    return ProcessStep("samples", key, store, spec, "trainer.loop.sample").write_spec()


def pass_at_k(samples: StageOutput, held_out: StageOutput, scorers: list | None = None, k: int | None = None,
              exp: Experiment | None = None) -> float:
    """The held-out pass@k: the mean over held-out prompts of the unbiased estimate from each
    prompt's n samples, c of them passing (Chen et al. 2021, `trainer.training.scorers.pass_at_k`);
    `k` left out: each prompt's n (then it is the fraction of prompts with a passing sample). A
    sample passes by the first of `scorers` (built `trainer.training.scorers.Scorer`s), else by
    `exp`'s scorers (`eval.scorers`, or the loop's verifier), else by exact match after stripping;
    a sample its scorer erred on does not pass. A prompt without samples counts as unsolved."""
    from trainer.training.scorers import build_scorers, experiment_scorers, judge_all, scorer_sample
    from trainer.training.scorers import pass_at_k as unbiased

    scorer = (scorers or (experiment_scorers(exp) if exp is not None else build_scorers(None)))[0]
    with open(held_out.path / HELD_OUT, encoding="utf-8") as f:
        rows = {str(row["row_id"]): row for row in map(json.loads, filter(str.strip, f))}
    drawn = [s for s in read_samples(samples.path).to_pylist() if s["prompt_id"] in rows]
    # As a held-out answer is judged: `prompt` is what the row asked, as the loop's filters hand it.
    batch = [{**scorer_sample(rows[s["prompt_id"]], s["text"], i), **s} for i, s in enumerate(drawn)]
    outcomes = judge_all(scorer, batch)
    counts: dict[str, list[int]] = {pid: [0, 0] for pid in rows}  # prompt id: [n, c]
    for s, (outcome, _) in zip(batch, outcomes):
        counts[s["prompt_id"]][0] += 1
        counts[s["prompt_id"]][1] += outcome == "pass"
    estimates = [unbiased(n, c, k or n) if n else 0.0 for n, c in counts.values()]
    return sum(estimates) / len(estimates) if estimates else 0.0


def filter_code_identity(cfg: LoopConfig, base_dir: str | Path) -> dict[str, dict[str, str]]:
    """{dotted path: {module: digest of its source}} of the verifier and scorer functions, with the
    project modules they import (`trainer.core.identity.code_identity`): editing one, or a helper
    it imports, filters again."""
    from trainer.core.identity import code_identity

    identity = {}
    for entry in cfg.filters:
        if not isinstance(entry, dict):
            continue
        for name, options in entry.items():
            dotted = options if name == "verifier" else (options or {}).get("scorer") if name == "best_k" else None
            if isinstance(dotted, str):
                identity[dotted] = code_identity(resolve_function(dotted, Path(base_dir)))
    return identity


def _prompt_rows(exp: Experiment, prompts: dict[str, StageOutput]) -> dict[str, dict[str, Any]]:
    """{prompt id: {"record": the raw row, "reference": …}} of the prompts that were sampled."""
    raw = read_rows(prompts["raw"])
    records = dict(zip(map(str, raw.column("row_id").to_pylist()), map(json.loads, raw.column("record").to_pylist())))
    rows = {}
    with open(prompts["templated"].path / HELD_OUT, encoding="utf-8") as f:
        for line in f:
            held = json.loads(line)
            rows[str(held["row_id"])] = {"record": records[str(held["row_id"])], "reference": held["reference"]}
    return rows


def _asked_and_trained(exp: Experiment, record: dict, answer: str) -> tuple[Any, dict[str, Any]]:
    """What the prompt asked (a string, or the conversation before its last answer) and the
    training row that answers it with `answer`."""
    example = normalize(record, exp.data)
    asked = asked_of(example)
    if example.kind == "messages" and asked is not None:
        return asked, {"messages": asked + [{"role": "assistant", "content": answer}]}
    if example.kind == "prompt_completion" and isinstance(asked, str):
        return asked, {"prompt": asked, "completion": answer}
    if example.kind == "messages":
        raise RowError("messages: no assistant turn (a loop prompt's conversation ends with the answer it asks for)")
    raise RowError(f"{example.kind} rows cannot be loop prompts (messages or prompt/completion rows can)")


def build_accepted(exp: Experiment, cfg: LoopConfig, round_index: int, samples: StageOutput,
                   prompts: dict[str, StageOutput], previous: StageOutput | None,
                   replay: StageOutput | None = None) -> StageOutput:
    """Filter the round's samples; the kept ones become training rows (with the previous
    rounds' rows when `loop.training.data` is all_rounds, adding only the rows they lack), and
    with `loop.training.replay` > 0 rows of the SFT training data (`replay`: the data group's raw
    train split) drawn so they make up that fraction of the training rows. Every sample is kept
    or rejected with the filter and reason (`rejected.jsonl`); an accepted and a wrongly answered
    sample of the same prompt make a preference pair (TRL's preference format: `pairs.jsonl`
    conversational, `pairs_text.jsonl` for string prompts)."""
    all_rounds = cfg.training.data == "all_rounds"
    fraction = cfg.training.replay
    if fraction > 0 and replay is None:
        raise ValueError(f"loop.training.replay is {fraction:g}: the round needs the SFT raw train split to replay")
    inputs = [samples.key, prompts["templated"].key] + ([previous.key] if all_rounds and previous else [])
    replay_seed = (cfg.generation.seed, round_index)
    replay_params = {"fraction": fraction, "sft_raw": replay.key, "seed": list(replay_seed)} if fraction > 0 else None
    key = Store(exp.store_root).key("accepted", dict(zip(("samples", "prompts", "previous"), inputs)), keys.accepted_params(
        cfg.filters, cfg.drop_truncated, filter_code_identity(cfg, exp.base_dir), cfg.training.data, replay_params))

    def build(tmp: Path) -> dict[str, Any]:
        started = time.time()
        rows = _prompt_rows(exp, prompts)
        batch = []
        for s in read_samples(samples.path).to_pylist():
            row = rows[s["prompt_id"]]
            asked, _ = _asked_and_trained(exp, row["record"], s["text"])
            batch.append({**s, "prompt": asked, "reference": row["reference"]})
        result = build_pipeline(cfg.filters, drop_truncated=cfg.drop_truncated, base_dir=Path(exp.base_dir)).run(batch)
        training_rows = _earlier_rounds_rows(previous) if all_rounds and previous is not None else []
        # all_rounds adds to the earlier rounds' rows only those they lack: a question answered the
        # same way again is not added twice, or the questions solved early would weigh more each
        # round. (Within a round every accepted row stays, as in `round` mode.)
        earlier = {json.dumps(row, sort_keys=True) for row in training_rows}
        repeated = 0
        for s in result.accepted:
            row = _asked_and_trained(exp, rows[s["prompt_id"]]["record"], s["text"])[1]
            if json.dumps(row, sort_keys=True) in earlier:
                repeated += 1
            else:
                training_rows.append(row)
        replayed, replay_rejected = [], []
        if fraction > 0:
            wanted = round(fraction * len(training_rows) / (1 - fraction))
            replayed, replay_rejected = _replay_rows(exp, replay, wanted, replay_seed)
        # Replayed rows last, their lines in replayed.jsonl: the next all_rounds round leaves them out.
        _write_jsonl(tmp / REPLAYED_ROWS, [{"row_id": row_id, "line": len(training_rows) + i}
                                           for i, (row_id, _) in enumerate(replayed)])
        _write_jsonl(tmp / REPLAY_REJECTED_ROWS, [{"row_id": row_id, "reason": reason}
                                                  for row_id, reason in replay_rejected])
        training_rows += [row for _, row in replayed]
        _write_jsonl(tmp / ACCEPTED_ROWS, training_rows)
        _write_jsonl(tmp / REJECTED_ROWS, [{"prompt_id": r.sample["prompt_id"], "sample_index": r.sample["sample_index"],
                                            "text": r.sample["text"], "filter": r.filter, "reason": r.reason}
                                           for r in result.rejected])
        pairs = preference_pairs(result)
        by_file = {PAIRS: [p for p in pairs if not isinstance(p["prompt"], str)],
                   TEXT_PAIRS: [p for p in pairs if isinstance(p["prompt"], str)]}
        for name, rows_of_form in by_file.items():
            _write_jsonl(tmp / name, rows_of_form)
        return {"round": round_index, "metrics": result.metrics(), "training_rows": len(training_rows),
                "repeated_from_earlier_rounds": repeated, "replayed_rows": len(replayed),
                "replay_rejected": len(replay_rejected), "preference_pairs": len(pairs),
                "preference_pairs_by_file": {name: len(rows_of_form) for name, rows_of_form in by_file.items()},
                "filter_seconds": round(time.time() - started, 3)}

    return Store(exp.store_root).get_or_build("accepted", key, build)


def _earlier_rounds_rows(previous: StageOutput) -> list[dict]:
    """The previous round's training rows but those it replayed from the SFT data (each round
    draws its own)."""
    replayed_lines = set()
    if (previous.path / REPLAYED_ROWS).is_file():
        with open(previous.path / REPLAYED_ROWS, encoding="utf-8") as f:
            replayed_lines = {json.loads(line)["line"] for line in f if line.strip()}
    with open(previous.path / ACCEPTED_ROWS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row for i, row in enumerate(rows) if i not in replayed_lines]


def _replay_rows(exp: Experiment, raw: StageOutput, wanted: int, seed: tuple[int, int]
                 ) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Up to `wanted` rows of the SFT raw split, drawn without replacement in a seeded order, each
    as the training row a round reads: ([(row_id, row)], [(row_id, why it is unusable)])."""
    import numpy as np

    table = read_rows(raw)
    formatting_func = load_formatting_func(exp.data.formatting_func) if exp.data.format == "formatting_func" else None
    replayed, rejected = [], []
    for i in np.random.default_rng(list(seed)).permutation(table.num_rows).tolist():
        if len(replayed) >= wanted:
            break
        row_id = table.column("row_id")[i].as_py()
        try:
            example = normalize(json.loads(table.column("record")[i].as_py()), exp.data, formatting_func)
        except RowError as e:
            rejected.append((row_id, e.reason))
            continue
        replayed.append((row_id, _as_training_row(example)))
    return replayed, rejected


def _as_training_row(example: Example) -> dict[str, Any]:
    """A normalised SFT row in the field names a round's data (`format: auto`, default fields) reads."""
    if example.kind == "messages":
        row = {"messages": example.messages}
    elif example.kind == "prompt_completion":
        row = {"prompt": example.prompt, "completion": example.completion}
    elif example.kind == "text":
        row = {"text": example.text}
    else:  # tokens
        row = {"input_ids": example.input_ids, **({"labels": example.labels} if example.labels is not None else {})}
    return {**row, **({"tools": example.tools} if example.tools else {})}


def preference_pairs(result: FilterResult) -> list[dict[str, Any]]:
    """Per prompt, its accepted samples paired in sample order with those a correctness filter
    rejected (answer_regex, verifier, best_k's losers), min of the two counts, in TRL's
    preference format: conversational (`prompt` a messages list, `chosen`/`rejected` one
    assistant turn each) or standard (all three strings). `prompt_id` and the samples' indices
    ride along (DPOTrainer drops columns it does not use)."""
    def in_sample_order(samples: list[dict]) -> dict[Any, list[dict]]:
        by_prompt: dict[Any, list[dict]] = {}
        for s in sorted(samples, key=lambda s: s["sample_index"]):
            by_prompt.setdefault(s["prompt_id"], []).append(s)
        return by_prompt

    chosen = in_sample_order(result.accepted)
    worse = in_sample_order([r.sample for r in result.rejected if r.filter in CORRECTNESS_FILTERS])
    pairs = []
    for pid, good in chosen.items():
        for c, r in zip(good, worse.get(pid, [])):
            pairs.append({"prompt": c["prompt"], "chosen": _answer_as(c["prompt"], c["text"]),
                          "rejected": _answer_as(c["prompt"], r["text"]), "prompt_id": pid,
                          "chosen_sample": c["sample_index"], "rejected_sample": r["sample_index"]})
    return pairs


def _answer_as(prompt: Any, text: str) -> Any:
    """An answer in its prompt's form: a string, or the assistant turn that follows a conversation."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def round_experiment(exp: Experiment, cfg: LoopConfig, round_index: int, accepted: StageOutput,
                     start_model: Path, previous_adapter: Path | None) -> Experiment:
    """The experiment a round trains: the accepted rows as its data (no eval split), the starting
    model as its base, the round's own training settings where `loop.training` gives them, and
    (continue mode) the previous round's adapter to continue."""
    data = dataclasses.replace(
        exp.data, name=f"{exp.data_group}-loop", format="auto", fields=FieldNames(), formatting_func=None,
        source=SourceConfig(path=str(accepted.path / ACCEPTED_ROWS)), eval=EvalConfig(source=None, fraction=0.0))
    lora = dataclasses.replace(exp.training.lora, init_adapter=str(previous_adapter) if previous_adapter else None)
    if cfg.training.modules_to_save is not None:
        lora = dataclasses.replace(lora, modules_to_save=list(cfg.training.modules_to_save) or None)
    own = {name: getattr(cfg.training, name) for name in ("learning_rate", "num_train_epochs", "max_steps", "warmup_steps")
           if getattr(cfg.training, name) is not None}
    tracking = dataclasses.replace(exp.tracking, experiment_name=exp.tracking.experiment_name or f"{exp.name}-loop")
    return dataclasses.replace(exp, name=f"{exp.name}-round-{round_index}", data=data, tracking=tracking,
                               model=dataclasses.replace(exp.model, base=str(start_model)),
                               training=dataclasses.replace(exp.training, lora=lora, **own))


def pack_round(round_exp: Experiment, tokenizer: StageOutput) -> dict[str, StageOutput]:
    """The accepted rows through the data stages: raw → templated → tokenized → packed."""
    pipeline = DataPipeline(round_exp, progress=False)
    raw = pipeline.raw("train")
    templated = pipeline.templated("train", raw, tokenizer)
    tokenized = pipeline.tokenized("train", templated, tokenizer)
    return {"tokenizer": tokenizer, "raw/train": raw, "templated/train": templated, "tokenized/train": tokenized,
            "packed/train": pipeline.packed("train", tokenized)}


# -- a round, planned once ------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundUpstream:
    """What a round is made from, as its assets receive it."""

    start_model: StageOutput | None  # the loop's starting model: round 0's generator, every round's base
    tokenizer: StageOutput | None
    prompts: dict[str, StageOutput]  # {"raw", "templated"} of the loop's prompts
    held_out: StageOutput | None  # the data group's templated eval split (its held-out prompts)
    previous: dict[str, StageOutput] = dataclasses.field(default_factory=dict)  # round r-1's, by step


@dataclass(frozen=True)
class RoundPlan:
    """One round of the loop, planned from its upstream alone: every round asset reads this value,
    so generation, filtering, training and evaluation agree on the generator, the previous round's
    outputs and the round's derived experiment."""

    exp: Experiment
    cfg: LoopConfig
    index: int
    upstream: RoundUpstream

    @property
    def generator(self) -> StageOutput:
        return self.upstream.start_model if self.index == 0 else self.upstream.previous["round_eval"]

    @property
    def previous_accepted(self) -> StageOutput | None:
        return self.upstream.previous.get("round_accepted") if self.cfg.training.data == "all_rounds" else None

    @property
    def previous_adapter(self) -> Path | None:
        previous = self.upstream.previous.get("round_adapter") if self.cfg.training.adapter == "continue" else None
        return previous.path if previous is not None else None

    @property
    def held_out_file(self) -> Path | None:
        return self.upstream.held_out.path / HELD_OUT if self.upstream.held_out is not None else None

    def samples(self) -> ProcessStep:
        return plan_samples(self.exp, self.cfg, self.index, self.generator, self.upstream.tokenizer,
                            self.upstream.prompts["templated"])

    def accepted(self, samples: StageOutput, replay: StageOutput | None = None) -> StageOutput:
        """`replay`: the data group's raw train split (`raw_dataset`'s "train"), read when
        `loop.training.replay` > 0."""
        return build_accepted(self.exp, self.cfg, self.index, samples, self.upstream.prompts, self.previous_accepted,
                              replay)

    def experiment(self, accepted: StageOutput) -> Experiment:
        """The experiment this round trains and evaluates (its accepted rows on the starting model)."""
        return round_experiment(self.exp, self.cfg, self.index, accepted, self.upstream.start_model.path,
                                self.previous_adapter)

    def adapter(self, accepted: StageOutput, tags: dict[str, str]):
        """(the round's packed data, the training step): the accepted rows through the data stages."""
        from trainer.training.launch import plan_adapter

        round_exp = self.experiment(accepted)
        data = pack_round(round_exp, self.upstream.tokenizer)
        return data, plan_adapter(round_exp, data, tags=tags, held_out=self.held_out_file)

    def merge(self, accepted: StageOutput, adapter: StageOutput):
        """The merge step of the round's adapter into the starting model, planned from the same experiment as its training."""
        from trainer.training.launch import plan_merge

        return plan_merge(self.experiment(accepted), adapter, self.upstream.tokenizer.path)

    def scoring(self, accepted: StageOutput, adapter: StageOutput, merged: StageOutput):
        """The scoring step of the round's merged model and of the starting model (the "before",
        keyed by its own key: scored once for every round) on the held-out prompts."""
        from trainer.training.launch import plan_score

        return plan_score(self.experiment(accepted), merged, adapter, self.upstream.tokenizer.path, self.held_out_file,
                          base_key=self.upstream.start_model.key)

    def pass_at_k_samples(self, merged: StageOutput) -> ProcessStep | None:
        """k samples per held-out prompt from the round's model (None when k is 1 or nothing is held out)."""
        if self.cfg.generation.samples_per_prompt <= 1 or self.upstream.held_out is None:
            return None
        return plan_samples(self.exp, self.cfg, self.index, merged, self.upstream.tokenizer, self.upstream.held_out)


def plan_round(exp: Experiment, index: int, upstream: RoundUpstream) -> RoundPlan:
    from trainer.loop.settings import loop_config

    return RoundPlan(exp, loop_config(exp), index, upstream)


def lineage(exp: Experiment, cfg: LoopConfig, start_model_key: str) -> dict[str, Any]:
    """What every round of the loop is made with: the loop's settings but its stop rules and
    schedule, its filters' code, the training and model settings, the data group and the starting
    model. A round made with another lineage is not continued from: it is made again."""
    from trainer.core.keys import adapter_training_params

    loop = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("stop", "schedule")}
    if not cfg.training.replay:  # as before replay existed: loops that replay nothing keep their rounds
        del loop["training"]["replay"]
    training = adapter_training_params(exp.training)  # the settings the adapter key is made of
    return {"loop": loop, "filter_code": filter_code_identity(cfg, exp.base_dir), "training": training,
            "model": dataclasses.asdict(exp.model), "data_group": exp.data_group, "start_model": start_model_key}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
