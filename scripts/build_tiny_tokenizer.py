"""Train the shipped tiny BPE tokenizer (`builtin:tiny`) on the embedded default data.

    python scripts/build_tiny_tokenizer.py [--out trainer/resources/tiny_tokenizer]

Byte-level BPE (every string encodes, `decode(encode(s)) == s` exactly, newlines and leading
spaces included), digits split one per token, special tokens `<s>` (bos), `</s>` (eos) and
`<unk>`. No chat template and no ChatML tokens: the pipeline adds ChatML itself. The
post-processor adds nothing (no automatic BOS/EOS). Deterministic: running it twice writes
identical files.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from trainer.data import default_data  # noqa: E402

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]
DEFAULT_OUT = ROOT / "trainer" / "resources" / "tiny_tokenizer"
CORPUS_ROWS = {"train": 20000, "test": 2000}


def corpus() -> list[str]:
    """Texts to train on: the default data rendered roughly as the pipeline renders it (role
    names on their own lines, so "user"/"assistant"/"system" become single tokens), plus every
    printable ASCII character so that all of them get a token of their own."""
    texts = []
    for split, rows in CORPUS_ROWS.items():
        for rec in default_data.generate(split, rows, seed=0):
            if "messages" in rec:
                texts.append("".join(f"{m['role']}\n{m['content']}\n" for m in rec["messages"]))
            else:
                texts.append(rec["prompt"] + rec["completion"])
    texts.append(string.printable)
    texts.append(" ".join(string.ascii_letters) + " " + " ".join(string.punctuation))
    return texts


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)

    from transformers import PreTrainedTokenizerFast

    tok = build()
    texts = corpus()
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids
        if tok.decode(ids, skip_special_tokens=False) != t:
            raise SystemExit(f"round-trip failed for {t!r}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.is_file():
            p.unlink()
    fast.save_pretrained(str(out))
    # Normalise the JSON files (sorted keys in the config, stable formatting).
    for p in sorted(out.glob("*.json")):
        data = json.loads(p.read_text())
        p.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=p.name != "tokenizer.json") + "\n")
    print(f"wrote {out} (vocab {tok.get_vocab_size()}, files {sorted(x.name for x in out.iterdir())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
