"""The loop's sampler on a tiny real Llama (and GPT-2) and a real tokenizer: samples per prompt,
stop reasons and token counts, left padding, multi-token stop strings, reproducibility, finished
rows dropped from the batch, and shards that a killed generation resumes from."""

from __future__ import annotations

import collections
import copy
from contextlib import contextmanager
from dataclasses import replace

import pyarrow as pa
import pytest
import torch

from tests.train_helpers import make_tokenizer
from trainer.core.config import TokenizerConfig
from trainer.data.tokenizer_loading import load_tokenizer
from trainer.training.generate import (
    END_OF_TURN,
    LENGTH,
    SamplingSettings,
    generate_to_shards,
    read_samples,
    sample,
    stop_tokens_and_strings,
)

EOS = 3  # make_tokenizer: <pad> 0, <unk> 1, <s> 2, </s> 3, words 4..29, <|im_start|> 30, <|im_end|> 31
NOT_WORDS = [0, 1, 2, 30, 31]
PROMPTS = [{"prompt_id": f"p{i}", "prompt": text} for i, text in enumerate([
    "<s> alpha", "<s> one two three four five", "<s> what is the answer", "<s> x", "<s> gamma delta plus minus"])]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


@contextmanager
def logits_rule(model, rule):
    """`rule(input_ids, logits)` edits the model's last-position logits in place on every forward."""
    def hook(module, args, kwargs, output):
        rule(kwargs["input_ids"], output.logits[:, -1])
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def bias(eos: float):
    """Words only, and eos with the given bias (−1e4: never)."""
    def rule(input_ids, logits):
        logits[:, NOT_WORDS] -= 1e4
        logits[:, EOS] += eos
    return rule


def eos_after(word_id: int):
    """Words only, and eos whenever the last token is `word_id` (greedy then stops right after it)."""
    def rule(input_ids, logits):
        logits[:, NOT_WORDS + [EOS]] -= 1e4
        logits[input_ids[:, -1] == word_id, EOS] += 2e4
    return rule


def key(records):
    return {(r.prompt_id, r.sample_index): r for r in records}


def test_samples_per_prompt_are_numbered_and_independent_of_batching(model, tok):
    settings = SamplingSettings(samples_per_prompt=3, temperature=1.0, max_new_tokens=6, seed=7, batch_size=2)
    with logits_rule(model, bias(eos=-1e4)):
        records = sample(model, tok, PROMPTS, settings)
        assert [(r.prompt_id, r.sample_index) for r in records] == [(p["prompt_id"], s) for p in PROMPTS
                                                                     for s in range(3)]
        assert all(r.stop_reason == LENGTH and r.token_count == 6 == len(r.text.split()) and r.seed == 7
                   for r in records)
        for p in PROMPTS:  # n samples of one prompt are n different draws
            assert len({r.text for r in records if r.prompt_id == p["prompt_id"]}) > 1
        # A sample is drawn from its own generator: other batch sizes, prompt orders and batch-mates
        # give it the same tokens; another seed does not.
        regrouped = sample(model, tok, PROMPTS[::-1], replace(settings, batch_size=5))
        alone = [r for p in PROMPTS for r in sample(model, tok, [p], settings)]
        reseeded = sample(model, tok, PROMPTS, replace(settings, seed=8))
    assert key(regrouped) == key(records) == key(alone)
    assert [r.text for r in reseeded] != [r.text for r in records]


def test_stop_reasons_and_token_counts_while_sampling(model, tok):
    settings = SamplingSettings(samples_per_prompt=4, temperature=1.0, top_p=0.95, max_new_tokens=8, batch_size=3)
    with logits_rule(model, bias(eos=1.5)):  # eos about one draw in seven
        records = sample(model, tok, PROMPTS, settings)
    assert {r.stop_reason for r in records} == {END_OF_TURN, LENGTH}
    for r in records:  # every generated id is one word of the text, plus the eos that ended it
        if r.stop_reason == LENGTH:
            assert r.token_count == 8 == len(r.text.split()), r
        else:
            assert r.token_count == len(r.text.split()) + 1 <= 8, r


def test_greedy_equals_each_prompt_generated_alone(model, tok):
    with logits_rule(model, bias(eos=-1e4)):
        free = sample(model, tok, PROMPTS[:1], SamplingSettings(temperature=0, max_new_tokens=6))[0]
    stop_word = tok.convert_tokens_to_ids(free.text.split()[1])
    settings = SamplingSettings(temperature=0, max_new_tokens=6, batch_size=len(PROMPTS))
    with logits_rule(model, eos_after(stop_word)):
        batched = sample(model, tok, PROMPTS, settings)
        for p, r in zip(PROMPTS, batched):
            ids = tok(p["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
            new = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=EOS,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
            count = new.index(EOS) + 1 if EOS in new else len(new)
            assert (r.token_count, r.text) == (count, tok.decode(new[:count], skip_special_tokens=True)), p
            assert r.stop_reason == (END_OF_TURN if EOS in new else LENGTH)
    # The first prompt stops after the stop word; left padding changes no other prompt's tokens.
    assert (batched[0].token_count, batched[0].stop_reason) == (3, END_OF_TURN)
    assert LENGTH in {r.stop_reason for r in batched}


def test_a_stop_string_of_several_tokens_cuts_the_text_and_ends_the_turn():
    from transformers import LlamaConfig, LlamaForCausalLM

    # The shipped BPE tokenizer: transformers matches stop strings against pieces of text, which a
    # word-level vocabulary does not have.
    tok = load_tokenizer(TokenizerConfig(path="builtin:tiny"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    prompts = [{"prompt_id": "add", "prompt": "add 12 and 30:"}, {"prompt_id": "rev", "prompt": "reverse abc:"}]
    settings = SamplingSettings(temperature=0, max_new_tokens=12)

    # Whole ASCII pieces only: a random model's stray UTF-8 byte pieces would decode to "�", which
    # no stop string matches.
    banned = [i for i in range(len(tok)) if i in tok.all_special_ids
              or not (tok.decode([i]).isascii() and tok.decode([i]).isprintable())]

    def ascii_pieces(input_ids, logits):
        logits[:, banned] -= 1e4

    with logits_rule(model, ascii_pieces):
        ids = tok(prompts[0]["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        new = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        stop = tok.decode(new[3:6])
        assert stop_tokens_and_strings(tok, [stop]) == ([tok.eos_token_id], [stop])  # several tokens
        free = sample(model, tok, prompts, settings)
        cut = sample(model, tok, prompts, settings, stop_tokens=[stop])
    text = tok.decode(new)
    assert free[0].text == text and free[0].stop_reason == LENGTH
    assert cut[0].text == text[:text.find(stop)]
    ends = next(k for k in range(1, len(new) + 1) if stop in tok.decode(new[:k]))
    assert (cut[0].token_count, cut[0].stop_reason) == (ends, END_OF_TURN)
    assert cut[1] == free[1] or (stop not in cut[1].text and cut[1].stop_reason == END_OF_TURN)


def test_the_models_own_generation_config_changes_nothing(model, tok):
    from peft import LoraConfig, get_peft_model

    settings = SamplingSettings(temperature=0, max_new_tokens=5)
    with logits_rule(model, bias(eos=-1e4)):
        plain = sample(model, tok, PROMPTS, settings)
        own, saved = model.generation_config, copy.deepcopy(model.generation_config)
        # What a merged or hub model may carry: sampling defaults, suppressed tokens, stop strings.
        model.generation_config.update(do_sample=True, top_k=1, repetition_penalty=5.0, stop_strings=["alpha"],
                                       suppress_tokens=[tok.convert_tokens_to_ids(plain[0].text.split()[0])])
        try:
            assert sample(model, tok, PROMPTS, settings) == plain
            # A PEFT model copies its config onto the base model while generating; a fresh LoRA
            # adapter changes no logits.
            peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
            assert sample(peft_model, tok, PROMPTS, settings) == plain
            assert model.generation_config is own and peft_model.generation_config.suppress_tokens
            peft_model.unload()
        finally:
            model.generation_config = saved


def test_a_killed_generation_resumes_from_its_shards(model, tok, tmp_path):
    settings = SamplingSettings(samples_per_prompt=2, temperature=0.9, max_new_tokens=6, seed=3, batch_size=2)
    run = dict(round_index=2, generator_version="adapter-abc", prompts_per_shard=2)
    prefill_rows: list[int] = []

    def count_prefills(input_ids, logits):
        if input_ids.shape[1] > 1:
            prefill_rows.append(input_ids.shape[0])
            if killed_after is not None and len(prefill_rows) > killed_after:
                raise KeyboardInterrupt("killed")

    killed_after = None
    with logits_rule(model, bias(eos=1.0)), logits_rule(model, count_prefills):
        whole = generate_to_shards(tmp_path / "whole", model, tok, PROMPTS, settings, ["<|im_end|>"], **run)
        expected = read_samples(tmp_path / "whole")

        prefill_rows.clear()
        killed_after = 1  # killed while generating the second shard, after writing the first
        with pytest.raises(KeyboardInterrupt):
            generate_to_shards(tmp_path / "resumed", model, tok, PROMPTS, settings, ["<|im_end|>"], **run)
        killed_after = None
        assert sorted(p.name for p in (tmp_path / "resumed").glob("samples-*")) == ["samples-00000.arrow"]
        # ... and as if also killed mid-write: a truncated temporary shard, never read.
        partial = (tmp_path / "whole" / "samples-00001.arrow").read_bytes()
        (tmp_path / "resumed" / ".samples-00001.arrow.partial").write_bytes(partial[: len(partial) // 2])

        prefill_rows.clear()
        resumed = generate_to_shards(tmp_path / "resumed", model, tok, PROMPTS, settings, ["<|im_end|>"], **run)
        assert sum(prefill_rows) == 3  # prompts p2, p3, p4 only, each prefilled once for its two samples
        prefill_rows.clear()
        assert generate_to_shards(tmp_path / "resumed", model, tok, PROMPTS, settings, ["<|im_end|>"], **run) == whole
        assert not prefill_rows

    table = read_samples(tmp_path / "resumed")
    assert table.equals(expected) and resumed == whole
    assert table.num_rows == whole["samples"] == 10 and whole["shards"][-1] == "samples-00002.arrow"
    assert set(table["round"].to_pylist()) == {2} and set(table["generator_version"].to_pylist()) == {"adapter-abc"}
    assert whole["tokens"] == sum(table["token_count"].to_pylist())
    assert pa.compute.sum(table["seed"]).as_py() == 3 * 10
    with pytest.raises(ValueError, match=r"differs in settings"):
        generate_to_shards(tmp_path / "resumed", model, tok, PROMPTS, replace(settings, temperature=0.5), **run)


@pytest.mark.parametrize("prompts, settings, message", [
    (PROMPTS, dict(temperature=0, samples_per_prompt=2), r"0 \(greedy\) repeats one sample"),
    (PROMPTS + [{"prompt_id": "p1", "prompt": "<s> y"}], {},
     r"prompts\[5\]: prompt_id 'p1' already used by prompts\[1\]"),
    ([{"prompt_id": "a", "text": "<s> y"}], {}, r"prompts\[0\]: expected"),
    (PROMPTS, dict(top_p=0), r"top_p: must be in \(0, 1\]"),
])
def test_mistakes_are_named(model, tok, prompts, settings, message):
    with pytest.raises(ValueError, match=message):
        sample(model, tok, prompts, SamplingSettings(**settings))


def test_prompts_prefilled_once_give_the_samples_of_prefilling_each_copy(model, tok, monkeypatch):
    """The shared prefill (one cache per prompt, copied for its samples) changes how much is
    computed, not what is sampled: left-padded prompts of different lengths, four samples each."""
    from trainer.training import generate as generate_module

    settings = SamplingSettings(samples_per_prompt=4, temperature=1.0, max_new_tokens=6, seed=5, batch_size=2)
    prompts = [p for p in PROMPTS if len(p["prompt"].split()) >= 3]  # prefixes of 2+ tokens: counted below
    prefill_rows: list[int] = []

    def count_prefills(input_ids, logits):
        if input_ids.shape[1] > 1:
            prefill_rows.append(input_ids.shape[0])

    with logits_rule(model, bias(eos=0.0)), logits_rule(model, count_prefills):
        shared = sample(model, tok, prompts, settings)
        assert sum(prefill_rows) == len(prompts)  # once per prompt, not once per sample
        prefill_rows.clear()
        monkeypatch.setattr(generate_module, "_shared_prefill", lambda *args: {})
        copied = sample(model, tok, prompts, settings)
        assert sum(prefill_rows) == len(prompts) * 4
    assert [(r.prompt_id, r.sample_index) for r in shared] == [(r.prompt_id, r.sample_index) for r in copied]
    assert [r.text for r in shared] == [r.text for r in copied]
    assert len({r.text for r in shared}) > len(prompts)  # the samples of a prompt differ: a real draw


def test_a_pad_token_the_model_has_no_row_for_pads_with_an_id_it_has(model, tok):
    """A pretrained base sampled with the data stage's tokenizer, whose set-up added a pad token
    the base has no embedding row for (SmolLM2: pad was its eos): the left padding uses an id in
    range, and the masked padding changes no sample."""
    padded_tok = copy.deepcopy(tok)
    padded_tok.add_special_tokens({"pad_token": "<|pad|>"})
    assert padded_tok.pad_token_id >= model.get_input_embeddings().weight.shape[0]
    settings = SamplingSettings(samples_per_prompt=2, temperature=1.0, max_new_tokens=4, seed=3, batch_size=5)
    with logits_rule(model, bias(eos=0.0)):
        assert [r.text for r in sample(model, padded_tok, PROMPTS, settings)] == \
            [r.text for r in sample(model, tok, PROMPTS, settings)]


WORDS = "add reverse the sum of and is what to count list letters numbers 12 30 7 abc xyz".split()


def tiny_model(architecture: str, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=1)).eval()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_dropping_finished_rows_samples_what_decoding_every_row_samples(architecture, monkeypatch):
    """The sampler drops a row from the batch once it has stopped; transformers' `generate` (the
    sampler before, still used for caches whose rows cannot be dropped) decodes every row until the
    batch's last one stops. Same texts, token counts and stop reasons, with rows stopping at every
    step: greedy and sampled, 1 and 4 samples per prompt, stop ids, multi-token stop strings,
    max_new_tokens hit and not, left-padded prompts of 1 to 14 words in batches of 3 to 16.
    The remaining rows round a few sums differently in a smaller batch (as in any other batch
    composition), so a draw on a near tie could differ; none does in these cases."""
    from trainer.training import generate as generate_module

    tok = load_tokenizer(TokenizerConfig(path="builtin:tiny"))
    model = tiny_model(architecture, len(tok))
    words = iter(torch.randint(len(WORDS), (200,), generator=torch.Generator().manual_seed(1)).tolist())
    prompts = [{"prompt_id": f"q{i}", "prompt": " ".join(WORDS[next(words)] for _ in range(1 + i % 14))}
               for i in range(16)]
    # Stops the random model says after a few tokens: tokens it generates often (what each decoding
    # step is fed), and pieces of its text that are several tokens long.
    generated: collections.Counter = collections.Counter()

    def count_generated(input_ids, logits):
        if input_ids.shape[1] == 1:
            generated.update(input_ids[:, 0].tolist())

    with logits_rule(model, count_generated):
        free = sample(model, tok, prompts, SamplingSettings(temperature=0, max_new_tokens=16))
    stop_ids = [t for t, _ in generated.most_common(6)[2:]]
    stop_strings = []
    for r in free:  # of each text, the middle one of its pieces of three characters that are several tokens
        pieces = sorted({r.text[k:k + 3] for k in range(len(r.text) - 2)} - set(stop_strings), key=r.text.find)
        pieces = [p for p in pieces if p.isascii() and p.isprintable()
                  and len(tok(p, add_special_tokens=False)["input_ids"]) > 1]
        stop_strings += pieces[len(pieces) // 2:][:1]
    assert stop_tokens_and_strings(tok, stop_strings)[1] == stop_strings and len(stop_strings) > 2
    # (settings, stops, whether the model also says eos after about one token in eight)
    cases = [
        (SamplingSettings(temperature=0, max_new_tokens=8, batch_size=5), stop_strings, False),
        (SamplingSettings(samples_per_prompt=4, temperature=1.0, top_p=0.9, max_new_tokens=12, batch_size=3, seed=1),
         stop_ids[2:] + stop_strings[:1], True),
        (SamplingSettings(samples_per_prompt=4, temperature=0.7, max_new_tokens=20, batch_size=16, seed=2), stop_ids,
         True),
        (SamplingSettings(samples_per_prompt=4, temperature=1.3, max_new_tokens=16, batch_size=6, seed=3),
         stop_strings[:4], False),
        (SamplingSettings(temperature=1.0, max_new_tokens=5, batch_size=4, seed=4), stop_ids[:1], True),
    ]
    decode_rows: list[int] = []

    def count_decode_rows(input_ids, logits):
        if input_ids.shape[1] == 1:
            decode_rows.append(input_ids.shape[0])

    def eos_after_every_eighth_token(input_ids, logits):
        logits[input_ids[:, -1] % 8 == 0, tok.eos_token_id] += 1e4

    def run(settings, stops, eos_rule):
        with logits_rule(model, eos_after_every_eighth_token if eos_rule else lambda *args: None):
            return sample(model, tok, prompts, settings, stops)

    with logits_rule(model, count_decode_rows):
        dropped = [run(*case) for case in cases]
        dropping_rows = sum(decode_rows)
        decode_rows.clear()
        monkeypatch.setattr(generate_module, "_rows_can_be_dropped", lambda model: False)
        kept = [run(*case) for case in cases]
    assert dropped == kept
    assert dropping_rows < 0.8 * sum(decode_rows)  # finished rows were not computed
    for (settings, _, _), records in zip(cases, kept):  # each case stops rows at many different steps
        assert len(records) == len(prompts) * settings.samples_per_prompt
        assert {r.stop_reason for r in records} == {END_OF_TURN, LENGTH}, settings
        assert len({r.token_count for r in records if r.stop_reason == END_OF_TURN}) >= 3, settings
    # Stop strings only (the random model does not say eos): rows ended by several tokens.
    assert any(r.stop_reason == END_OF_TURN for r in kept[3])
