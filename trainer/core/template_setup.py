"""The template set-up a tokenizer was prepared with, stored beside it as `template_setup.json`.

Written by the data stage (`trainer.data.templating.save_tokenizer`), read where it is stored by
every later stage: the data stages, training (end-of-turn text, added tokens) and merging.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

TEMPLATE_SETUP_FILE = "template_setup.json"
PAD_TOKEN = "<|pad|>"


@dataclass
class TemplateSetup:
    chat_template: Optional[str]
    added_tokens: list[str] = field(default_factory=list)
    # True when tokens were added to the vocabulary: the model's embeddings must be resized.
    embeddings_must_grow: bool = False
    # The end-of-turn text the template writes right after assistant content ("<|im_end|>",
    # "</s>", "<end_of_turn>", ...; "" when it writes none). Trained with each assistant turn,
    # whatever tokens it becomes; one special token or several ordinary ones.
    eot_token: Optional[str] = None
    pad_token: str = PAD_TOKEN
    # Whether raw text / prompt-completion rows start with the bos token string (the tokenizer's
    # post-processor prepends BOS in normal use, but pieces are tokenized without special tokens).
    bos_in_text: bool = False
    # Marker strings the template writes that are not special tokens of the tokenizer: each is
    # trained as several ordinary tokens (template.add_markers adds them as special tokens).
    markers_not_special: list[str] = field(default_factory=list)
    # Whether add_generation_prompt=True renders exactly the training text before an answer
    # (None: the template could not be probed).
    generation_prompt_matches_training: Optional[bool] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TemplateSetup":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, tok_dir: Union[str, Path]) -> None:
        (Path(tok_dir) / TEMPLATE_SETUP_FILE).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))


def load_template_setup(tok_dir: Union[str, Path]) -> TemplateSetup:
    return TemplateSetup.from_dict(json.loads((Path(tok_dir) / TEMPLATE_SETUP_FILE).read_text()))
