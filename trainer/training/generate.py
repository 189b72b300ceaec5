"""Sampling completions for the generate → filter → train loop, and greedy decoding for evaluation.

`sample` decodes batches of prompts: left padded with an attention mask, KV cache,
`samples_per_prompt` sequences per prompt, prompts sorted by length. Each prompt is prefilled
once and its cache copied for its samples (`_shared_prefill`), not prefilled once per sample. The
steps are those of transformers' greedy `generate` with our logits processors and stop criteria,
but a row that has stopped leaves the batch (`_decode_dropping_finished`): `generate` computes
every row until the batch's longest sample stops. A model whose cache rows cannot be dropped is
decoded by `generate` itself (`_generate_keeping_finished`). It stops at the tokenizer's
eos and the given stops: a stop that is one token is a stop id, a longer one (an end-of-turn
marker the tokenizer lacks, such as "<|im_end|>" spelled in pieces) a stop string. Only the new
token ids are decoded; the text ends before the first stop. Temperature 0 is greedy decoding and
needs `samples_per_prompt` 1 (more greedy samples would only repeat the first).

What is reproducible: each sample draws its tokens from its own random generator, seeded by
`sample_seed(settings.seed, prompt_id, sample_index)`. A sample therefore does not depend on which
prompts share its batch, the batch size, the prompt order, the shard size or whether the run was
resumed, given the same model weights, device type and library versions. Prompts padded to
different widths, and batches of other sizes (as when finished rows leave), give slightly
different floating-point sums, so a draw that falls on a near tie can still come out differently.

`generate_to_shards` writes the samples of `prompts_per_shard` prompts at a time to
`samples-00000.arrow`, ... (temporary file, then rename) and `manifest.json` last; a killed run,
started again, generates only the prompts whose shard is missing. torch and transformers are
imported only to generate, so the orchestrator can read samples (`read_samples`) without them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from trainer.core.arrow_io import read_table, write_table

END_OF_TURN = "end_of_turn"
LENGTH = "length"

SHARD_GLOB = "samples-*.arrow"
PLAN = "plan.json"
MANIFEST = "manifest.json"

SAMPLES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("text", pa.string()),
    ("token_count", pa.int32()),
    ("stop_reason", pa.string()),
    ("round", pa.int64()),
    ("generator_version", pa.string()),
    ("seed", pa.int64()),
])


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_prompt: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16  # prompts per `generate` call, each run as samples_per_prompt sequences

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling {name}: must be at least 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature: must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError("sampling temperature: 0 (greedy) repeats one sample; set samples_per_prompt to 1 "
                             "or sample with temperature > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p: must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class SampleRecord:
    prompt_id: str
    sample_index: int
    text: str  # the new tokens decoded (special tokens dropped), ending before the first stop
    token_count: int  # ids the model generated for this sample, its stop token(s) included
    stop_reason: str  # END_OF_TURN or LENGTH (max_new_tokens reached without a stop)
    seed: int  # settings.seed; the sample's own generator is seeded by sample_seed(...)


def stop_tokens_and_strings(tokenizer, stop_tokens: Iterable[str | int] = ()) -> tuple[list[int], list[str]]:
    """eos id(s) of the tokenizer plus the given stops: ids, and single-token strings as ids; a
    stop that is several tokens of this tokenizer (an end-of-turn marker written as text, such as
    "<|im_end|>" for a tokenizer without it) is a stop string."""
    ids: list[int] = []
    strings: list[str] = []
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.append(eos)
    elif eos:
        ids.extend(int(e) for e in eos)
    for tok in stop_tokens:
        if tok is None or tok == "":
            continue
        if isinstance(tok, int):
            ids.append(tok)
            continue
        enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(int(enc[0]))
        else:
            strings.append(tok)
    return sorted(set(ids)), strings


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(json.dumps([seed, prompt_id, sample_index]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample(model, tokenizer, prompts: Sequence[Mapping], settings: SamplingSettings,
           stop_tokens: Iterable[str | int] = (),
           on_prompts_done: Callable[[int], None] | None = None) -> list[SampleRecord]:
    """Samples for `prompts` (`{"prompt_id": str | int, "prompt": str}`, the prompt exactly as
    generation sees it: template and bos included, so it is tokenized without special tokens), in
    prompt order then sample order. `on_prompts_done(n)` is called after each batch of n prompts."""
    import torch

    items = _checked_prompts(prompts)
    if not items:
        return []
    encoded = tokenizer([text for _, text in items], add_special_tokens=False)["input_ids"]
    for (prompt_id, _), ids in zip(items, encoded):
        if not ids:
            raise ValueError(f"prompt {prompt_id!r}: tokenizes to no tokens")
    stops, stop_strings = stop_tokens_and_strings(tokenizer, stop_tokens)
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id >= model.get_input_embeddings().weight.shape[0]:
        # No pad, or one the set-up added and this model has no row for (a pretrained base sampled
        # with the data stage's tokenizer): padded positions are masked, any id in range will do.
        pad_id = stops[0] if stops else 0
    n = settings.samples_per_prompt
    stop_criteria = _stop_criteria(tokenizer, stops, stop_strings)
    decode = _decode_dropping_finished if _rows_can_be_dropped(model) else _generate_keeping_finished
    device = _device_of(model)
    # Longest first: similar lengths share a batch, and an out-of-memory shows in the first one.
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
    records: dict[int, list[SampleRecord]] = {}
    with _generating(model), torch.no_grad():
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - len(encoded[i]):] = 1
            new_ids, stopped_at = decode(
                model, ids.to(device), mask.to(device), n, settings.max_new_tokens,
                _sampler(settings, [items[i][0] for i in batch], device), stop_criteria, stops, pad_id)
            for row, (row_ids, row_stopped_at) in enumerate(zip(new_ids, stopped_at)):
                i = batch[row // n]
                records.setdefault(i, []).append(_record(
                    items[i][0], row % n, row_ids, row_stopped_at, stops, stop_strings, tokenizer, settings.seed))
            if on_prompts_done is not None:
                on_prompts_done(len(batch))
    return [r for i in range(len(items)) for r in records[i]]


def _rows_can_be_dropped(model) -> bool:
    """Whether the model's KV cache is one of key/value tensors per layer (transformers'
    DynamicCache of full or sliding-window attention layers), whose rows `batch_select_indices`
    drops; a recurrent or quantized layer keeps state that would not follow."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config transformers cannot lay a cache out for: its own generate decides
        return False
    return bool(layers) and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


def _decode_dropping_finished(model, ids, mask, n: int, max_new_tokens: int, processors, stop_criteria,
                              stops: list[int], pad_id: int) -> tuple[list[list[int]], list[int]]:
    """Each row's new ids and after how many it stopped (0: never), for the prompts `ids` (left
    padded, `mask`) repeated n times. The forward passes, logits processors and stop criteria of
    transformers' greedy `generate` (`_generate_keeping_finished`), but a row that has stopped
    leaves the batch: its input, mask, positions, cache rows and generator. `generate` computes
    every row until the batch's last one stops, though samples of one batch end at very different
    lengths. The remaining rows keep their width and positions (the cache is only indexed by row),
    so what they attend to is unchanged; only their floating-point sums may round differently in
    a smaller batch, as in any other batch composition. (`stops`, `pad_id`: used by `generate`.)"""
    import torch

    cache_kwarg, last_logits_only = _cache_kwarg(model), _last_logits_only(model)
    cache = next(iter(_shared_prefill(model, ids, mask, n).values()), None)  # the prompts but their last tokens
    sequences, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    step_ids, step_positions = (sequences, positions) if cache is None else (sequences[:, -1:], positions[:, -1:])
    # As `generate`: no mask when no prompt of the batch is padded (the model then builds none),
    # and the batch's mask to the end when one is, whichever rows remain.
    padded = not bool(mask.all())
    rows = list(range(sequences.shape[0]))  # the batch row of each remaining row
    new_ids: list[list[int]] = [[] for _ in rows]
    stopped_at = [0] * len(rows)
    for step in range(1, max_new_tokens + 1):
        out = model(input_ids=step_ids, attention_mask=mask if padded else None, position_ids=step_positions,
                    **{cache_kwarg: cache}, **last_logits_only, use_cache=True, return_dict=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        scores = processors(sequences, out.logits[:, -1].to(dtype=torch.float32, copy=True))
        tokens = scores.argmax(dim=-1)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        done = stop_criteria(sequences, scores).tolist()
        for row, token, stopped in zip(rows, tokens.tolist(), done):
            new_ids[row].append(token)
            if stopped:
                stopped_at[row] = step
        remaining = [k for k, stopped in enumerate(done) if not stopped]
        if not remaining or step == max_new_tokens:
            break
        if len(remaining) < len(rows):
            keep = torch.tensor(remaining, device=sequences.device)
            cache.batch_select_indices(keep)
            sequences, mask, tokens, step_positions = sequences[keep], mask[keep], tokens[keep], step_positions[keep]
            rows = [rows[k] for k in remaining]
            for processor in processors:
                if isinstance(processor, _SeededDraw):
                    processor.keep(remaining)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
        step_ids, step_positions = tokens[:, None], step_positions[:, -1:] + 1
    return new_ids, stopped_at


def _generate_keeping_finished(model, ids, mask, n: int, max_new_tokens: int, processors, stop_criteria,
                               stops: list[int], pad_id: int) -> tuple[list[list[int]], list[int]]:
    """`_decode_dropping_finished` by transformers' `generate`, which feeds a stopped row padding
    until the batch's last row stops: for a cache whose rows cannot be dropped, and the reference
    the faster decoding is checked against. Greedy steps: a sampled token is drawn by `_sampler`
    (transformers' do_sample would add its default top-k and draw from the global generator). Each
    prompt is repeated n times here, as num_return_sequences would (which greedy decoding refuses)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=stops or None, pad_token_id=pad_id)
    recorder = _StopRecorder(stop_criteria, ids.shape[1])
    out = model.generate(
        input_ids=ids.repeat_interleave(n, dim=0), attention_mask=mask.repeat_interleave(n, dim=0),
        generation_config=config, logits_processor=processors, stopping_criteria=StoppingCriteriaList([recorder]),
        **_shared_prefill(model, ids, mask, n))
    return out[:, ids.shape[1]:].tolist(), recorder.stopped_at.tolist()


def _shared_prefill(model, ids, mask, n: int) -> dict:
    """The KV cache of each prompt but its last token, computed once and copied n times: without
    it `generate` prefills every prompt once per sample, which dominates sampling when prompts
    are long and answers short (a few-shot prompt of 100 tokens, answers of 10). Positions are
    counted from each row's first real token, as `generate` counts them under left padding."""
    if n == 1 or ids.shape[1] < 2:
        return {}
    prefix, prefix_mask = ids[:, :-1], mask[:, :-1]
    positions = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
    out = model(input_ids=prefix, attention_mask=prefix_mask, position_ids=positions, use_cache=True,
                **_last_logits_only(model))
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(n)
    return {_cache_kwarg(model): cache}


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it, as `generate` passes it: only the last
    position's logits are read, and the LM head over every prompt position would be about a fifth
    of a small model's prefill (SmolLM2: 49k-word vocabulary, hidden size 576). It changes no
    hidden state, so no cache entry."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def _forward_parameters(model) -> set[str]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def generate_to_shards(out_dir: str | Path, model, tokenizer, prompts: Sequence[Mapping], settings: SamplingSettings,
                       stop_tokens: Sequence[str | int] = (), *, round_index: int, generator_version: str,
                       prompts_per_shard: int = 256) -> dict:
    """`sample` over `prompts`, `prompts_per_shard` prompts per Arrow shard (SAMPLES_SCHEMA), in
    `out_dir`; returns the manifest. Started again on the same directory, it generates only the
    shards that are missing; a directory that holds another generation (other prompts, settings,
    stops, round or generator) is refused. One writer per directory: a second one waits for the first."""
    if prompts_per_shard < 1:
        raise ValueError(f"prompts_per_shard: must be at least 1, got {prompts_per_shard}")
    out = Path(out_dir)
    items = _checked_prompts(prompts)
    plan = {"round": round_index, "generator_version": generator_version, "settings": asdict(settings),
            "stop_tokens": list(stop_tokens), "prompts_per_shard": prompts_per_shard,
            "prompts": len(items), "prompts_sha256": hashlib.sha256(json.dumps(items).encode()).hexdigest()}
    out.mkdir(parents=True, exist_ok=True)
    with _one_writer(out):
        return _generate_to_shards(out, model, tokenizer, prompts, items, settings, stop_tokens, plan, round_index,
                                   generator_version, prompts_per_shard)


@contextmanager
def _one_writer(out: Path) -> Iterator[None]:
    """Held while writing `out`: a second sampler of it (two runs of one round) waits, then
    resumes from or returns what the first left, instead of writing the same `.partial` files.
    A flock: the kernel frees it when its holder dies. Beside `out`, not in it (it is uploaded)."""
    import logging

    from filelock import FileLock, Timeout

    lock = FileLock(str(out.parent / f".{out.name}.writer.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logging.getLogger("sftdag.sample").warning("%s: another sampler is writing it; waiting for it", out)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _generate_to_shards(out: Path, model, tokenizer, prompts, items, settings, stop_tokens, plan: dict,
                        round_index: int, generator_version: str, prompts_per_shard: int) -> dict:
    from tqdm.auto import tqdm

    _check_or_write_plan(out, plan)
    if (out / MANIFEST).exists():
        return json.loads((out / MANIFEST).read_text())
    shards = [prompts[start:start + prompts_per_shard] for start in range(0, len(items), prompts_per_shard)]
    missing = [k for k in range(len(shards)) if not (out / _shard_name(k)).exists()]
    done = len(items) - sum(len(shards[k]) for k in missing)
    with tqdm(total=len(items), initial=done, unit="prompt", desc=f"round {round_index} samples",
              disable=None) as bar:
        for k in missing:
            records = sample(model, tokenizer, shards[k], settings, stop_tokens, on_prompts_done=bar.update)
            with _atomic(out / _shard_name(k)) as tmp:
                write_table(tmp, _samples_table(records, round_index, generator_version))
    table = read_samples(out)
    reasons = {r["values"]: r["counts"] for r in pc.value_counts(table["stop_reason"]).to_pylist()}
    manifest = {**plan, "samples": table.num_rows, "shards": [_shard_name(k) for k in range(len(shards))],
                "stop_reasons": {END_OF_TURN: reasons.get(END_OF_TURN, 0), LENGTH: reasons.get(LENGTH, 0)},
                "tokens": int(pc.sum(table["token_count"]).as_py() or 0)}
    with _atomic(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def read_samples(out_dir: str | Path) -> pa.Table:
    """Every sample shard in `out_dir`, in prompt order."""
    paths = sorted(Path(out_dir).glob(SHARD_GLOB))
    if not paths:
        return SAMPLES_SCHEMA.empty_table()
    return pa.concat_tables([read_table(p) for p in paths])


def _checked_prompts(prompts: Sequence[Mapping]) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for row, p in enumerate(prompts):
        if not isinstance(p, Mapping) or not isinstance(p.get("prompt"), str) or not p["prompt"]:
            raise ValueError(f"prompts[{row}]: expected {{\"prompt_id\": str | int, \"prompt\": non-empty str}}")
        pid = p.get("prompt_id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ValueError(f"prompts[{row}]: prompt_id must be a str or int, got {pid!r}")
        pid = str(pid)
        if pid in seen:
            raise ValueError(f"prompts[{row}]: prompt_id {pid!r} already used by prompts[{seen[pid]}]")
        seen[pid] = row
        items.append((pid, p["prompt"]))
    return items


def _record(prompt_id: str, sample_index: int, new_ids: list[int], stopped_at: int, stops: list[int],
            stop_strings: list[str], tokenizer, seed: int) -> SampleRecord:
    # A row stopped at step k may hold padding after its k-th new token (`generate` pads it until
    # the batch ends); one never stopped ran to max_new_tokens.
    ids = new_ids[:stopped_at] if stopped_at else new_ids
    text = tokenizer.decode(ids[:-1] if stopped_at and ids[-1] in stops else ids, skip_special_tokens=True)
    cut = min((j for j in (text.find(s) for s in stop_strings) if j >= 0), default=len(text))
    return SampleRecord(prompt_id, sample_index, text[:cut], len(ids), END_OF_TURN if stopped_at else LENGTH, seed)


def _stop_criteria(tokenizer, stops: list[int], stop_strings: list[str]):
    from transformers import EosTokenCriteria, StoppingCriteriaList, StopStringCriteria

    criteria = [EosTokenCriteria(eos_token_id=stops)] if stops else []
    if stop_strings:
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    return StoppingCriteriaList(criteria)


class _StopRecorder:
    """A stopping criterion (transformers calls it like one): the stop ids and strings, remembering
    after how many new tokens each row first stopped (0: not stopped), which `generate`'s output
    does not say."""

    def __init__(self, criteria, prompt_width: int):
        self.criteria = criteria
        self.prompt_width = prompt_width
        self.stopped_at = None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = self.criteria(input_ids, scores, **kwargs)
        if self.stopped_at is None:
            self.stopped_at = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        first = done & (self.stopped_at == 0)
        self.stopped_at[first] = input_ids.shape[1] - self.prompt_width
        return done


class _SeededDraw:
    """A logits processor (transformers calls it like one) that draws each row's next token from
    that sample's own generator and leaves only the drawn token finite, so the greedy step takes
    it. transformers' own sampling draws the whole batch from the global generator, which would
    tie a sample to its batch-mates."""

    def __init__(self, seeds: list[int], device):
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        probs = scores.softmax(dim=-1)
        drawn = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn[:, None], 0.0)

    def keep(self, rows: list[int]) -> None:
        """Only these rows remain in the batch (the others have stopped)."""
        self.generators = [self.generators[k] for k in rows]


def _sampler(settings: SamplingSettings, prompt_ids: list[str], device):
    """Temperature and top-p (transformers' warpers), then one draw per row; nothing for greedy
    decoding."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    if settings.temperature == 0:
        return LogitsProcessorList()
    warpers = [TemperatureLogitsWarper(settings.temperature)] if settings.temperature != 1 else []
    if settings.top_p < 1:
        warpers.append(TopPLogitsWarper(settings.top_p))
    seeds = [sample_seed(settings.seed, pid, s) for pid in prompt_ids for s in range(settings.samples_per_prompt)]
    return LogitsProcessorList([*warpers, _SeededDraw(seeds, device)])


@contextmanager
def _generating(model) -> Iterator[None]:
    """Eval mode, and only our GenerationConfig: transformers fills every setting a passed config
    leaves unset from the model's own `generation_config` (a merged model's stop strings, a hub
    model's sampling defaults, suppressed tokens), so that is blank while we generate. A PEFT
    model copies its own onto the base model in `generate`, so both are set aside."""
    from transformers import GenerationConfig

    holders = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    own = [h.generation_config for h in holders]
    was_training = model.training
    model.eval()
    for h in holders:
        h.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for h, config in zip(holders, own):
            h.generation_config = config
        if was_training:
            model.train()


def _device_of(model):
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _samples_table(records: list[SampleRecord], round_index: int, generator_version: str) -> pa.Table:
    columns = {name: [getattr(r, name) for r in records]
               for name in ("prompt_id", "sample_index", "text", "token_count", "stop_reason", "seed")}
    columns["round"] = [round_index] * len(records)
    columns["generator_version"] = [generator_version] * len(records)
    return pa.table(columns, schema=SAMPLES_SCHEMA)


def _shard_name(index: int) -> str:
    return f"samples-{index:05d}.arrow"


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to, renamed to `path` once written. A kill
    mid-write leaves only the `.partial` file, which no glob matches and the next write of the
    same file replaces."""
    tmp = path.with_name(f".{path.name}.partial")
    yield tmp
    os.replace(tmp, path)


def _check_or_write_plan(out: Path, plan: dict) -> None:
    path = out / PLAN
    if path.exists():
        held = json.loads(path.read_text())
        differing = sorted(k for k in set(held) | set(plan) if held.get(k) != json.loads(json.dumps(plan)).get(k))
        if differing:
            raise ValueError(f"{out}: holds samples of another generation (differs in {', '.join(differing)}); "
                             "generate into a new directory")
        return
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(plan, indent=1))
