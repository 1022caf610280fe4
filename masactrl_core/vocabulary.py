"""The words a checkpoint declares it knows, and the warnings for prompts that use others.

A CLIP BPE tokenizer turns every word into tokens, so "the tokenizer knows it" says nothing
about whether the model learnt it: SD's 49,408-token vocabulary covers "house" whether or not a
model ever saw one. Only the checkpoint can say what it was trained on, so a model that was
trained on a closed vocabulary declares it in its folder's ``masactrl.json``::

    {"start_step": 4, "start_layer": 10, "vocabulary": ["a", "arms", "creature", ...]}

(the toy model's trainer writes its world's words there). A prompt word outside a declared
vocabulary is reported as a warning, never refused: the run still happens, and the warning says
why the picture may be a blur. A model that declares nothing gets no warnings.

Words are runs of letters, compared case-insensitively (CLIP's tokenizer lowercases); digits
and punctuation are not words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Vocabulary", "prompt_words"]

_WORD = re.compile(r"[^\W\d_]+")

# The declared list is named in full up to this many words; longer lists are counted.
_LISTED_WORDS = 40


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words, lowercased, each once, in order of first appearance."""
    return list(dict.fromkeys(match.lower() for match in _WORD.findall(prompt)))


@dataclass(frozen=True)
class Vocabulary:
    """The words a checkpoint declares it was trained on."""

    words: frozenset[str]

    @classmethod
    def of(cls, words: Iterable[str]) -> Vocabulary:
        return cls(frozenset(word.lower() for word in words))

    def unknown_words(self, prompt: str) -> list[str]:
        """The prompt's words outside the vocabulary, in order of first appearance."""
        return [word for word in prompt_words(prompt) if word not in self.words]

    def warnings(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        """One sentence per ``(field, prompt)`` that uses unknown words; none when all are known.

        ``field`` names the prompt the way the caller's user wrote it (``target_prompts[0]``,
        ``--target-prompt``), so the warning points at what to change.
        """
        trained_on = self._trained_on()
        warnings = []
        for field, prompt in prompts:
            unknown = self.unknown_words(prompt)
            if not unknown:
                continue
            quoted = ", ".join(f"'{word}'" for word in unknown)
            noun = "word" if len(unknown) == 1 else "words"
            warnings.append(
                f"{field}: the model does not know the {noun} {quoted}; {trained_on}, "
                "so the picture may not show what the prompt asks"
            )
        return warnings

    def _trained_on(self) -> str:
        words = sorted(self.words)
        if len(words) > _LISTED_WORDS:
            return f"it was trained on a vocabulary of {len(words)} words"
        return f"it was trained on {len(words)} words: {', '.join(words)}"
