"""Lookahead decoding (Fu et al., ICML 2024): Jacobi iteration as an n-gram generator.

Greedy decoding is the fixed point of ``y_p = argmax P(. | prefix, y_1 .. y_{p-1})`` over
the future positions p. Jacobi iteration updates every position at once from the current
guesses of the positions before it; it converges (at worst one position per iteration),
but too slowly to pay off by itself. Its trajectories, though, are good guesses of the
text ahead. Lookahead decoding therefore keeps the last N - 1 iterates in a 2-D window,
W positions wide, and turns every step into two branches of one target call:

- the lookahead branch (the draft's extra nodes) runs one more iteration over the window:
  each token's argmax output becomes the newest level, and the trajectories through the
  window become n-grams in a pool;
- the verification branch (the draft's tree) holds the pool's n-grams whose first token
  is the root, sharing common prefixes.

The window only ever produces guesses: verification accepts tokens by rule 1 (greedy) or
rule 5 (sampling: one draw from the target per visited node), so output is unchanged.

Window layout, positions relative to the root (position 0), once full: level 0 holds W - 1
tokens at 1 .. W - 1 (a block of W with the root); level l in 1 .. N - 2 holds W tokens at
l .. l + W - 1. Each step slides the window one position: the oldest level goes, the next
drops its first token (its position becomes the root's) and the newest iterate arrives.
Before the window is full (warm-up) every level stays and drops its first token; level 0
starts with W + N - 3 tokens copied at random from the context, so every level ends at
the same position W + N - 3 when the window fills.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from leapc.ir.errors import InputError
from leapc.ir.tree import tree_from_parents
from leapc.runtime.drafters.base import Draft, ExtraNodes, Verification


@dataclass(frozen=True)
class LookaheadConfig:
    # Defaults: the fastest measured on the bundled 15M model on a 2-core CPU, where every
    # extra step token costs (docs/decisions.md); wider windows raise tau, not speed, there.
    window: int = 3  # W: future positions the window iterates over
    ngram: int = 3  # N: n-gram length; the window keeps N - 1 iterates
    guesses: int = 3  # G: n-grams the pool keeps per first token (and verifies per step)
    pool_context: bool = True  # also pool the prompt's and the output's own n-grams

    def __post_init__(self):
        if self.window < 1 or self.ngram < 3 or self.guesses < 1:
            raise InputError(f"lookahead W,N,G = {self}: need W >= 1, N >= 3, G >= 1")

    def __str__(self) -> str:
        return f"{self.window},{self.ngram},{self.guesses}"

    @property
    def largest_window(self) -> int:
        """The most window tokens one step runs (warm-up can exceed the full window)."""
        return max(window_size(self.window, self.ngram, levels)
                   for levels in range(1, self.ngram))

    @property
    def smallest_step(self) -> int:
        """Nodes of a step running the largest window and one whole candidate n-gram."""
        return 1 + self.largest_window + self.ngram - 1


def window_size(width: int, ngram: int, levels: int) -> int:
    """Window tokens with ``levels`` levels: level 0 has W + N - 2 - levels tokens and
    every newer level one more (level l spans positions l .. W + N - 2 - levels + l)."""
    oldest = width + ngram - 2 - levels
    return oldest + (levels - 1) * (oldest + 1)


@dataclass
class JacobiWindow:
    """The last N - 1 Jacobi iterates; ``levels[0]`` is the oldest."""

    levels: list[np.ndarray]
    depth: int  # N - 1: levels when full

    @classmethod
    def start(cls, config: LookaheadConfig, context: Sequence[int],
              rng: np.random.Generator) -> JacobiWindow:
        """Level 0 copied at random from the context: plausible tokens, for a start."""
        first = rng.choice(np.asarray(context, dtype=np.int64),
                           size=config.window + config.ngram - 3)
        return cls([first], config.ngram - 1)

    @property
    def full(self) -> bool:
        return len(self.levels) == self.depth

    @property
    def size(self) -> int:
        return sum(len(level) for level in self.levels)

    def tokens(self) -> np.ndarray:
        return np.concatenate(self.levels)

    def coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Level and position (relative to the root) of every window token, level-major.

        Level 0 starts at position 1 (the root holds 0); level l >= 1 starts at l, one
        position after the level below, because its tokens are that level's outputs.
        """
        levels = [np.full(len(lv), i, dtype=np.int64) for i, lv in enumerate(self.levels)]
        positions = [max(i, 1) + np.arange(len(lv), dtype=np.int64)
                     for i, lv in enumerate(self.levels)]
        return np.concatenate(levels), np.concatenate(positions)

    def attention(self) -> np.ndarray:
        """``[E, E]``: which window tokens each window token attends to (itself included).

        The token at (level l, position p) was produced by the token at (l - 1, p - 1), one
        iteration earlier, whose own context ended with (l - 2, p - 2), and so on down to
        level 0, which is plain left-to-right text after the root. So it sees, at every
        distance d, the token at position p - d of level max(l - d, 0): its own trajectory.
        The n-gram read along that diagonal, extended by the token's output, is a chain in
        which every token is the model's guess after the ones before it.
        """
        level, position = self.coordinates()
        distance = position[:, None] - position[None, :]
        trajectory_level = np.maximum(level[:, None] - distance, 0)
        return (distance >= 0) & (level[None, :] == trajectory_level)

    def ngrams(self, root: int, outputs: np.ndarray) -> list[tuple[int, ...]]:
        """The full window's N-grams, one per column i of the newest level: the level-0
        block's token at position i (the root for i = 0), then column i of every level
        above it, then the newest level's output there — positions i .. i + N - 1."""
        firsts = np.concatenate([[root], self.levels[0]])
        columns = np.stack([*self.levels[1:], outputs], axis=1)
        return [(int(firsts[i]), *map(int, columns[i])) for i in range(len(outputs))]

    def advance(self, outputs: np.ndarray) -> None:
        """Slide one position and add the newest iterate (the newest level's outputs).

        An output at position p guesses position p + 1, which becomes p after the slide.
        Full window: the oldest level goes; the next one loses its first token (whose
        position the root takes). Warm-up: every level loses its first token, and so do
        the outputs unless they came from level 0 (level l starts at position l).
        """
        if self.full:
            self.levels = [self.levels[1][1:], *self.levels[2:], outputs]
            return
        newest = outputs if len(self.levels) == 1 else outputs[1:]
        self.levels = [level[1:] for level in self.levels] + [newest]


@dataclass
class NGramPool:
    """N-grams keyed by their first token; at most ``capacity`` continuations per key, the
    most recently seen kept (seeing one again makes it the most recent)."""

    capacity: int
    entries: dict[int, dict[tuple[int, ...], None]] = field(default_factory=dict)

    def add(self, ngram: tuple[int, ...]) -> None:
        kept = self.entries.setdefault(ngram[0], {})  # a dict keeps insertion order
        kept.pop(ngram[1:], None)
        kept[ngram[1:]] = None
        if len(kept) > self.capacity:
            del kept[next(iter(kept))]

    def continuations(self, first: int) -> list[tuple[int, ...]]:
        """The continuations after ``first``, most recent first."""
        return list(reversed(self.entries.get(first, {})))


def candidate_tree(root: int, continuations: Sequence[Sequence[int]],
                   budget: int) -> tuple[np.ndarray, list[int]]:
    """Tokens and parents of a trie of ``continuations`` under ``root`` (shared prefixes
    verified once), the earlier continuations first, at most ``budget`` nodes below root."""
    tokens, parents, node_of = [root], [-1], {(): 0}
    for continuation in continuations:
        for end in range(1, len(continuation) + 1):
            prefix = tuple(continuation[:end])
            if prefix in node_of:
                continue
            if len(tokens) > budget:
                return np.asarray(tokens, dtype=np.int64), parents
            node_of[prefix] = len(tokens)
            tokens.append(prefix[-1])
            parents.append(node_of[prefix[:-1]])
    return np.asarray(tokens, dtype=np.int64), parents


@dataclass
class LookaheadDrafter:
    config: LookaheadConfig
    rng: np.random.Generator  # the window's starting tokens
    pool: NGramPool = field(init=False)
    window: JacobiWindow | None = field(init=False, default=None)
    _next_end: int = field(init=False, default=0)  # end of the next context n-gram to pool

    def __post_init__(self):
        self.pool = NGramPool(self.config.guesses)

    def propose(self, context: list[int], root: int, budget: int) -> Draft:
        """Verify the root's pooled n-grams and, when it fits beside one whole candidate,
        iterate the window: near the token budget or max-seq only verification runs."""
        if self.window is None:
            self.window = JacobiWindow.start(self.config, context, self.rng)
            self._pool_context(context)
        iterate = budget >= self.window.size + self.config.ngram - 1
        tree_budget = budget - self.window.size if iterate else budget
        tokens, parents = candidate_tree(root, self.pool.continuations(root), tree_budget)
        tree = tree_from_parents(parents)
        return Draft(tokens, tree, extra=self._lookahead_nodes(tree.size) if iterate else None)

    def _lookahead_nodes(self, tree_size: int) -> ExtraNodes:
        """The window after the tree: each token sees the root and its own trajectory."""
        window = self.window
        mask = np.zeros((window.size, tree_size + window.size), dtype=bool)
        mask[:, 0] = True
        mask[:, tree_size:] = window.attention()
        return ExtraNodes(window.tokens(), window.coordinates()[1], mask)

    def observe(self, context: list[int], result: Verification) -> None:
        if result.extra_logits is not None:
            # The lookahead branch only generates guesses: greedy, whatever the sampling.
            newest = result.extra_logits[-len(self.window.levels[-1]):].argmax(axis=-1)
            if self.window.full:
                for ngram in self.window.ngrams(int(result.draft.tokens[0]), newest):
                    self.pool.add(ngram)
            self.window.advance(newest)
        self._pool_context(context)

    def _pool_context(self, context: list[int]) -> None:
        """Pool the context's n-grams that end in tokens not pooled yet."""
        if not self.config.pool_context:
            return
        n = self.config.ngram
        for end in range(max(self._next_end, n), len(context) + 1):
            self.pool.add(tuple(context[end - n : end]))
        self._next_end = len(context) + 1
