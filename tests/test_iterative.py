"""IterativeSFTTrainer (trainer/loop/iterative.py) on a real tiny Llama (plain and LoRA) and a real
WordLevel tokenizer. Each bug of TRL's IterativeSFTTrainer has a test naming it."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.train_helpers import REPO, TINY, make_tokenizer
from trainer.core.schemas import IGNORE_INDEX
from trainer.loop import iterative
from trainer.loop.iterative import IterativeSFTTrainer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return PreTrainedTokenizerFast.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def eos_pad_tok(tmp_path_factory):
    """A tokenizer whose pad token is its EOS (as many chat models ship)."""
    t = PreTrainedTokenizerFast.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id
    return t


def tiny_model(tok, *, lora: bool = True, dropout: float = 0.0, adapter_seed: int = 1):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), attention_dropout=0.0 if lora else dropout, **TINY))
    if not lora:
        return model
    torch.manual_seed(adapter_seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM", init_lora_weights="gaussian")
    return get_peft_model(model, config)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_loss(model, sequences: list[tuple[list[int], list[int]]]) -> float:
    """Token cross-entropy summed over every label token of the batch / their number, each
    sequence run alone (no padding), labels shifted by one by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in sequences:
            logits = model(input_ids=torch.tensor([input_ids])).logits[0].float()
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits[:-1], target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((target != IGNORE_INDEX).sum())
    return total / count


def trained_text(tok, seq) -> str:
    return tok.decode(seq.labels[1:][seq.labels[1:] != IGNORE_INDEX].tolist())


def optimizer_steps(trainer) -> int:
    return int(trainer.optimizer.state[trainer.trainable[0]]["step"])


def test_caller_labels_are_trained_exactly(eos_pad_tok):
    """TRL bug: for causal LMs the collator rebuilt labels from input_ids, discarding the caller's:
    the masked prompt was trained, and with pad == EOS the EOS was masked. Here the given labels
    (prompt masked, EOS = pad trained) are what is trained, and the loss is computed on them."""
    tok = eos_pad_tok
    rows = [ids(tok, "<s> what is one plus two three </s>"), ids(tok, "<s> question alpha beta </s>")]
    labels = [[IGNORE_INDEX] * 6 + row[6:] for row in rows[:1]] + [[IGNORE_INDEX] * 3 + rows[1][3:]]
    model = tiny_model(tok)
    trainer = IterativeSFTTrainer(model, tok)
    sequences = trainer.prepare_sequences(input_ids=rows, labels=labels)
    assert [s.labels.tolist() for s in sequences] == labels
    assert [trained_text(tok, s) for s in sequences] == ["three </s>", "beta </s>"]
    expected = reference_loss(model, list(zip(rows, labels)))
    assert expected != pytest.approx(reference_loss(model, list(zip(rows, rows))), rel=1e-3)
    metrics = trainer.step(input_ids=[torch.tensor(r) for r in rows], labels=[torch.tensor(lab) for lab in labels])
    assert metrics.label_tokens == 4
    assert metrics.loss == pytest.approx(expected, rel=1e-5)


def test_loss_is_the_mean_over_label_tokens_and_padding_is_masked_by_length(eos_pad_tok):
    """Padding is masked by length, not by pad id: with pad == EOS, an EOS inside a sequence is
    attended to and trained. The loss equals a hand computation on the unpadded sequences (TRL's
    tests only asserted that gradients were not None)."""
    tok = eos_pad_tok
    rows = [ids(tok, "<s> one </s> two </s> three four five six </s>"), ids(tok, "<s> a </s> b </s>"),
            ids(tok, "<s> x y")]
    model = tiny_model(tok)
    expected = reference_loss(model, [(r, r) for r in rows])
    metrics = IterativeSFTTrainer(model, tok, learning_rate=1e-2).step(input_ids=rows)
    assert metrics.label_tokens == sum(len(r) - 1 for r in rows)
    assert metrics.sequences == 3
    assert metrics.loss == pytest.approx(expected, rel=1e-5)


def test_attention_mask_zeros_are_not_trained_without_labels(tok):
    rows = [ids(tok, "<s> what is one plus two")]
    trainer = IterativeSFTTrainer(tiny_model(tok), tok)
    seq, = trainer.prepare_sequences(input_ids=rows, attention_mask=[[1, 1, 1, 1, 0, 0]])
    assert seq.labels.tolist() == rows[0][:4] + [IGNORE_INDEX, IGNORE_INDEX]


def test_micro_batches_make_one_full_batch_step(tok):
    """One optimizer update per step() call, whatever the micro-batching (TRL stepped the
    optimizer once per micro-batch); micro-batches sum to the full batch's loss and update."""
    rows = [ids(tok, t) for t in ["<s> what is one plus two three", "<s> a b", "<s> alpha beta gamma delta",
                                  "<s> x y z"]]
    whole = IterativeSFTTrainer(tiny_model(tok), tok, learning_rate=1e-2)
    micro = IterativeSFTTrainer(tiny_model(tok), tok, learning_rate=1e-2, micro_batch_size=1)
    for n in (1, 2, 3):
        a, b = whole.step(input_ids=rows), micro.step(input_ids=rows)
        assert (a.step, b.step, optimizer_steps(whole), optimizer_steps(micro)) == (n, n, n, n)
        assert micro.scheduler.last_epoch == n
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    for p, q in zip(whole.trainable, micro.trainable):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_texts_are_tokenized_as_written_and_all_trained(tok):
    texts = ["<s> what is one plus two three", "<s> a b"]
    trainer = IterativeSFTTrainer(tiny_model(tok), tok)
    sequences = trainer.prepare_sequences(texts=texts)
    assert [s.input_ids.tolist() for s in sequences] == [ids(tok, t) for t in texts]
    metrics = trainer.step(texts=texts)
    assert metrics.label_tokens == 6 + 2


def test_texts_labels_train_only_their_suffix(tok):
    """TRL bug: texts_labels was never used (labels were the tokenized texts). Here only the
    suffix texts_labels[i] is trained; a label that is not a suffix is refused, naming the row."""
    trainer = IterativeSFTTrainer(tiny_model(tok), tok)
    texts = ["<s> what is one plus two three", "<s> question alpha beta"]
    sequences = trainer.prepare_sequences(texts=texts, texts_labels=[" three", " alpha beta"])
    assert [trained_text(tok, s) for s in sequences] == ["three", "alpha beta"]
    assert trainer.step(texts=texts, texts_labels=[" three", " alpha beta"]).label_tokens == 3
    with pytest.raises(ValueError, match=r"row 1: texts_labels\[1\] is not a suffix of texts\[1\]"):
        trainer.prepare_sequences(texts=texts, texts_labels=[" three", " alpha"])


def test_prompt_completion_pairs_keep_the_prompt_tokens_and_train_the_completion_and_eos(eos_pad_tok):
    tok = eos_pad_tok
    trainer = IterativeSFTTrainer(tiny_model(tok), tok)
    prompts, completions = ["<s> <|im_start|> what is one plus two <|im_end|> <|im_start|>", "<s> question"], [
        " three", " alpha beta"]
    sequences = trainer.prepare_sequences(prompts=prompts, completions=completions, append_eos=True)
    for seq, prompt, completion in zip(sequences, prompts, completions):
        prompt_ids = ids(tok, prompt)
        assert seq.input_ids[:len(prompt_ids)].tolist() == prompt_ids
        assert (seq.labels[:len(prompt_ids)] == IGNORE_INDEX).all()
        assert seq.input_ids[-1] == tok.eos_token_id == tok.pad_token_id
        assert trained_text(tok, seq) == completion.strip() + " </s>"
    with pytest.raises(ValueError, match="completions: 1 for 2 prompts"):
        trainer.prepare_sequences(prompts=prompts, completions=completions[:1])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_cuts_each_sequence_not_the_batch(tok, mode):
    """TRL bug: keep_start/keep_end sliced the padded [B, T] tensors by rows (keeping the first or
    last max_length sequences). Here each sequence is cut alone and every sequence is kept."""
    texts = ["<s> what is one plus two three", "<s> alpha beta gamma delta x", "<s> a b c"]
    trainer = IterativeSFTTrainer(tiny_model(tok), tok, max_length=4, truncation_mode=mode)
    sequences = trainer.prepare_sequences(texts=texts)
    words = [t.split() for t in texts]
    kept = [w[:4] if mode == "keep_start" else w[-4:] for w in words]
    assert [tok.decode(s.input_ids.tolist()) for s in sequences] == [" ".join(k) for k in kept]
    assert all(torch.equal(s.labels[1:], s.input_ids[1:]) for s in sequences)
    metrics = trainer.step(texts=texts)
    assert (metrics.sequences, metrics.label_tokens) == (3, 9)


def test_truncation_that_leaves_nothing_to_train_names_the_row(tok):
    trainer = IterativeSFTTrainer(tiny_model(tok), tok, max_length=3, truncation_mode="keep_start")
    with pytest.raises(ValueError, match=r"row 1: no token to train after truncation to max_length=3 \(keep_start\)"):
        trainer.step(prompts=["<s> a", "<s> what is one plus"], completions=[" b", " two"])


def test_decaying_schedule_needs_a_length_and_starts_above_zero(tok):
    """TRL bug: with the default max_steps=-1 the linear schedule had length -1, so the learning
    rate was 0 from step 0 and nothing trained. A decaying schedule without a length is refused;
    with one, the first update uses the full learning rate and the schedule's end is enforced."""
    with pytest.raises(ValueError, match="'linear' decays over the run and needs total_steps"):
        IterativeSFTTrainer(tiny_model(tok), tok, lr_scheduler_type="linear")
    with pytest.raises(ValueError, match="total_steps: -1"):
        IterativeSFTTrainer(tiny_model(tok), tok, lr_scheduler_type="linear", total_steps=-1)
    trainer = IterativeSFTTrainer(tiny_model(tok), tok, learning_rate=1e-2, lr_scheduler_type="linear",
                                  total_steps=2)
    before = [p.detach().clone() for p in trainer.trainable]
    assert trainer.step(texts=["<s> a b c"]).learning_rate == pytest.approx(1e-2)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.trainable))
    assert trainer.step(texts=["<s> a b c"]).learning_rate == pytest.approx(0.5e-2)
    with pytest.raises(ValueError, match="step 3: the schedule ends at total_steps=2"):
        trainer.step(texts=["<s> a b c"])


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_save_then_load_continues_bitwise(tok, tmp_path, lora):
    """TRL bug: nothing was saved or resumable. A trainer loaded from a save (adapter or model
    weights, optimizer, scheduler, RNG, step) takes the same next step as one never stopped,
    bitwise, with dropout drawing from the restored RNG."""
    batches = [["<s> what is one plus two three", "<s> a b"], ["<s> alpha beta gamma", "<s> x y z"]]
    settings = {"learning_rate": 1e-2, "lr_scheduler_type": "linear", "total_steps": 4, "micro_batch_size": 1}
    first = IterativeSFTTrainer(tiny_model(tok, lora=lora, dropout=0.3), tok, **settings)
    first.step(texts=batches[0])
    saved = first.save(tmp_path / "ckpt")
    expected = first.step(texts=batches[1])

    torch.manual_seed(99)  # another process: other RNG draws, other fresh weights
    resumed = IterativeSFTTrainer(tiny_model(tok, lora=lora, dropout=0.3, adapter_seed=5), tok, **settings)
    resumed.load(saved)
    assert resumed.global_step == 1
    got = resumed.step(texts=batches[1])
    assert got == expected
    for (name, a), (_, b) in zip(first.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not saved.with_name("ckpt.partial").exists()
    if lora:
        assert (saved / "model" / "adapter_config.json").is_file()


def test_save_is_atomic_and_load_refuses_what_it_cannot_restore(tok, tmp_path, monkeypatch):
    trainer = IterativeSFTTrainer(tiny_model(tok), tok)
    trainer.step(texts=["<s> a b c"])
    saved = trainer.save(tmp_path / "ckpt")
    trainer.step(texts=["<s> a b c"])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(iterative.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(saved)
    monkeypatch.undo()
    assert saved.with_name("ckpt.partial").exists()
    other = IterativeSFTTrainer(tiny_model(tok), tok)
    other.load(saved)
    assert other.global_step == 1  # the earlier save, intact
    trainer.save(saved)
    other.load(saved)
    assert other.global_step == 2
    assert not saved.with_name("ckpt.partial").exists() and not saved.with_name("ckpt.old").exists()

    with pytest.raises(FileNotFoundError, match="not a saved trainer"):
        other.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="saved with other settings.*'learning_rate': \\(5e-05, 0.1\\)"):
        IterativeSFTTrainer(tiny_model(tok), tok, learning_rate=0.1).load(saved)


def test_free_device_cache_is_accepted_on_cpu_and_changes_nothing(tok):
    plain = IterativeSFTTrainer(tiny_model(tok), tok, learning_rate=1e-2)
    freeing = IterativeSFTTrainer(tiny_model(tok), tok, learning_rate=1e-2, free_device_cache=True)
    for _ in range(2):
        assert freeing.step(texts=["<s> a b c"]) == plain.step(texts=["<s> a b c"])


def test_step_leaves_the_model_in_its_mode(tok):
    """Generation between steps must not run with dropout because a step switched to train mode."""
    model = tiny_model(tok, dropout=0.3)
    model.eval()
    IterativeSFTTrainer(model, tok).step(texts=["<s> a b c"])
    assert not model.training


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of input_ids, texts, prompts"),
    ({"input_ids": [[2, 5]], "texts": ["a b"]}, "give exactly one of input_ids, texts, prompts"),
    ({"input_ids": [[2, 5, 6], [2, 5]], "labels": [[2, 5, 6], [2, 5, 6]]}, r"row 1: labels has shape \(3,\)"),
    ({"input_ids": [[2, 5], [2, 999]]}, r"row 1: input_ids outside the model's vocabulary"),
    ({"input_ids": [[2, 5], [2, 6]], "labels": [[-100, 5], [-100, -100]]}, "row 1: no token to train$"),
])
def test_user_mistakes_give_one_clear_error(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        IterativeSFTTrainer(tiny_model(tok), tok).step(**kwargs)


def test_one_string_instead_of_a_list_is_refused(tok):
    with pytest.raises(TypeError, match="texts: a list of strings, not one string"):
        IterativeSFTTrainer(tiny_model(tok), tok).step(texts="<s> a b")


def test_module_example_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    result = doctest.testmod(iterative, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
