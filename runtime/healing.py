"""Token healing: a prompt that ends anywhere continues as the model would have written it.

A tokenizer merges text greedily, so a prompt cut at a newline, a space or half a word
ends on a token the model rarely saw in that place: the bundled tokenizer writes "\\n"
followed by an indented line as "\\n   " + " return", so a prompt ending in a bare "\\n"
hands the model a token that, in training, almost never preceded code. Healing backs the
prompt up by its last token and makes the first generated token one whose text begins
with that token's text; the model then picks the merge ("\\n   ", "\\n\\n", ...) itself.

A word cut mid-way may end in several short tokens (" s" + "y"): the prompt is backed up
by as many as one vocabulary token can begin with (" sy", for " sys"). Only the first
generated token is constrained (its text covers all the backed-up text), and it is drawn from the prefill's logits before any draft exists, so every
policy stays exactly what `ar` emits with healing on: the constraint lives in
`decode.Progress`, which every decode loop shares. The completion's text leaves out the
backed-up text, which the prompt already has (`CompletionText`).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer

from leapc.runtime.detokenize import Detokenizer

# Tokens a prompt may be backed up by: enough for a word cut in two or three pieces.
MOST_BACKED_UP = 3


class TokenTexts:
    """Every token's text as it reads after another token (a SentencePiece decoder drops
    the leading space of a text's first token, which a context token keeps)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def after(self, context: int, tokens: list[int]) -> str:
        """The text of ``tokens`` following ``context``."""
        before = self.tokenizer.decode([context], skip_special_tokens=True)
        both = self.tokenizer.decode([context, *tokens], skip_special_tokens=True)
        return both[len(before):] if both.startswith(before) else ""

    @cached_property
    def texts(self) -> list[str]:
        """Each token's text after a plain context token: the first letter-only one, else
        the first with any text (a vocabulary of digits); all empty if none has text."""
        alone = [self.tokenizer.decode([i], skip_special_tokens=True)
                 for i in range(self.vocab_size)]
        anchor = next((i for i, text in enumerate(alone) if text.isalpha()),
                      next((i for i, text in enumerate(alone) if text), None))
        if anchor is None:
            return alone
        return [self.after(anchor, [token]) for token in range(self.vocab_size)]

    @cached_property
    def by_text(self) -> tuple[list[str], np.ndarray]:
        """The texts sorted, and the token of each: the texts beginning with a prefix are
        one contiguous run of them (cutting sorted strings to a length keeps them sorted)."""
        order = np.array(sorted(range(self.vocab_size), key=self.texts.__getitem__), np.int64)
        return [self.texts[i] for i in order], order

    def starting_with(self, prefix: str) -> np.ndarray:
        """``[V]`` bool: the tokens whose text begins with ``prefix`` (two bisections; a
        scan of the vocabulary per request cost the server's decode thread ~4%)."""
        texts, order = self.by_text
        head = lambda text: text[: len(prefix)]  # noqa: E731
        run = slice(bisect_left(texts, prefix, key=head), bisect_right(texts, prefix, key=head))
        allowed = np.zeros(self.vocab_size, bool)
        allowed[order[run]] = True
        return allowed


@dataclass(frozen=True, eq=False)
class Healing:
    """A prompt backed up by a few tokens: ``prefix`` is their text, ``allowed`` the
    tokens the first generated one may be (those beginning with ``prefix``)."""

    context: int  # the last token kept: the detokenizer's context for the completion
    prefix: str
    allowed: np.ndarray  # [V] bool, the backed-up token among them

    def constrain(self, logits: np.ndarray) -> np.ndarray:
        """The first token's logits with every token not starting with ``prefix`` cut."""
        return np.where(self.allowed, logits, -np.inf)


def heal(ids: list[int], texts: TokenTexts,
         most: int = MOST_BACKED_UP) -> tuple[list[int], Healing | None]:
    """The prompt to prefill and its healing: backed up by the most tokens (up to
    ``most``) whose text some single token begins with, so that one constrained token
    covers all of it (" s" + "y" backs up to " sy", which " sys" begins with). A prompt
    of one token, or one ending in a special token, is left as it is."""
    for k in range(min(most, len(ids) - 1), 0, -1):
        prefix = texts.after(ids[-k - 1], ids[-k:])
        if not prefix:
            continue
        allowed = texts.starting_with(prefix)
        if allowed.any():
            return ids[:-k], Healing(ids[-k - 1], prefix, allowed)
    return ids, None


class CompletionText:
    """A completion's final text from its tokens, piece by piece (`Detokenizer`); when
    healed, read after the prompt's last kept token and without the healed prefix, which
    the prompt already has."""

    def __init__(self, tokenizer: Tokenizer, healing: Healing | None):
        self.detokenizer = Detokenizer(tokenizer)
        self.left = ""  # healed text still to drop
        if healing is not None:
            self.detokenizer.push([healing.context])
            self.left = healing.prefix

    def push(self, ids: list[int]) -> str:
        return self._drop(self.detokenizer.push(ids))

    def flush(self) -> str:
        return self._drop(self.detokenizer.flush())

    def _drop(self, text: str) -> str:
        cut = min(len(self.left), len(text))
        if text[:cut] != self.left[:cut]:
            raise AssertionError(f"token healing: the completion begins {text[:cut]!r}, "
                                 f"not the healed prefix {self.left[:cut]!r}")
        self.left = self.left[cut:]
        return text[cut:]
