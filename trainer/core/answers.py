"""The answer a pattern finds in a text, compared as the loop's `answer_regex` filter and the
`answer_regex` scorer both compare it: one definition, so a sample the loop keeps is an answer
the evaluation passes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.core.config import ConfigError


def normalize(text: str) -> str:
    """Text compared for equality: whitespace runs collapsed, ends stripped, case folded."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class AnswerPattern:
    text: str  # as written in the YAML
    pattern: re.Pattern

    def answer(self, text: str) -> str | None:
        """The first group (or the whole match) of the first match, normalized; None without a match."""
        m = self.pattern.search(text)
        if m is None:
            return None
        found = m.group(1) if self.pattern.groups else m.group(0)
        return normalize(found) if found is not None else None

    def expected(self, reference: str) -> str:
        """What an answer must equal: the reference's own answer, else the whole reference."""
        want = self.answer(reference)
        return want if want is not None else normalize(reference)


def answer_pattern(text: object, where: str) -> AnswerPattern:
    """The compiled `pattern` setting at `where` (`loop.filters[0].answer_regex`); a ConfigError in one line."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}.pattern: expected a string, got {text!r}")
    try:
        return AnswerPattern(text, re.compile(text))
    except re.error as e:
        raise ConfigError(f"{where}.pattern: bad regular expression {text!r}: {e}") from None
