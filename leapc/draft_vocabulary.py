"""``--draft-vocab K``: the K tokens draft programs may propose (FR-Spec, Zhao et al. 2025).

The K most frequent tokens of a text, counted with the model's tokenizer: by default the
bundled corpus, which the bundled model was trained on (its greedy output on held-out
code stays entirely within the 2048 most frequent), or ``--draft-vocab-text`` for a model
trained on other text. The end-of-sequence ids are always kept, so a draft can propose
the end. `passes.restrict_draft_vocabulary` projects each draft program onto these ids;
verification is unchanged, so output is too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leapc.ir.errors import InputError
from leapc.models.loaders import BUNDLED


@dataclass(frozen=True)
class DraftVocabularyOptions:
    size: int
    text: str | list[Path] = BUNDLED  # a `leapc.datastore` text source


# The restricted projection's columns come in whole tiles of leapc's GEMM kernels.
TILE = 16


def frequent_tokens(tokenizer, options: DraftVocabularyOptions, vocab_size: int,
                    keep: tuple[int, ...]) -> tuple[int, ...]:
    """``keep`` and the most frequent token ids of the text (ties: the lower id), sorted:
    ``options.size`` ids in all, rounded up to a whole `TILE`."""
    if not 0 < options.size < vocab_size:
        raise InputError(f"--draft-vocab must be between 1 and {vocab_size - 1}, fewer than "
                         f"the model's {vocab_size} tokens (got {options.size})")
    from leapc.datastore import read_texts  # it imports the build stages, which import this

    _, texts = read_texts(options.text)
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    counts = np.bincount(np.concatenate([np.asarray(e.ids, np.int64) for e in encoded]),
                         minlength=vocab_size)[:vocab_size]
    total = min(-(-options.size // TILE) * TILE, vocab_size)
    chosen = dict.fromkeys(keep)
    for token in np.argsort(-counts, kind="stable").tolist():
        if len(chosen) >= total:
            break
        chosen.setdefault(token)
    return tuple(sorted(chosen))
