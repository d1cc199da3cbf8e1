"""Block-diffusion decoding (DESIGN §7c): a block of masked positions is unmasked over
several calls of the step program, then committed to the KV cache as ordinary context.

The step program is the autoregressive one: its ``mask`` input lets the block's rows see
the committed prefix and each other in both directions. A call carries, in order:

* the previous block's final tokens when they are not yet in the cache (the first call of
  every block after the first): causal rows whose ``present`` rows are committed, and
  whose last logits row predicts the new block's first token (logits are shifted: the row
  at position i predicts the token at i + 1, `BlockDiffusion.shift`);
* one or more *candidates*, states of the current block (mask id where undecided), each
  seeing the prefix, the previous block and itself.

The reference policy (``mdm``) makes one decision per call: among the masked positions,
the one whose chosen token is most probable (ties to the lower position) gets that token.
A decision's token is the argmax, or when sampling a Gumbel-max draw whose noise is keyed
by (seed, block, decision index) — so any policy that reaches the same state draws the
same token, which is what makes ``freedave`` reproduce ``mdm`` exactly.

Policies (`UnmaskingRule`):
* ``mdm``: the reference, one position per call.
* ``freedave`` (FreeDave, Wu & Zhang 2025; lossless): from one state's logits, draft the
  next ``depth`` reference decisions as if the logits did not change (past the first, only
  while the drafted token is at least ``gate`` probable: each draft costs a candidate's
  rows), evaluate every drafted state in one call (a forest of candidates sharing the
  prefix), and keep the longest run of drafts the reference would have made from the true
  logits. The first draft is always the reference's own decision, so a call never makes
  fewer than one.
* ``confidence`` (Fast-dLLM's threshold; lossy): every masked position whose chosen token
  has probability >= a threshold, at least the most confident one.
* ``prophet`` (early commit; lossy): the reference's one decision, but once every masked
  position's top-1 leads its top-2 by a margin, all of them at once.
* ``credit`` (CreditDecoding; lossy): each position accumulates its top-1 token's
  probability over calls (reset when the top-1 changes); positions whose credit reaches a
  threshold are decided, at least the most confident one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from leapc.ir.errors import InputError
from leapc.runtime.decode import GenerationStats, StopConfig, StopReason, timed_prefill
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig, probabilities
from leapc.runtime.step import StepFunction


@dataclass(frozen=True)
class BlockDiffusion:
    """A block-diffusion model's decoding contract (recorded by `leapc build`)."""

    block_size: int
    mask_id: int
    shift: int  # 1: the logits row at position i predicts position i + 1 (Dream); 0: i


@dataclass(frozen=True)
class DiffusionOptions:
    depth: int = 4  # freedave: reference decisions drafted per call
    gate: float = 0.0  # freedave: drafts past the first only while at least this probable
    threshold: float = 0.9  # confidence: decide positions at least this probable
    margin: float = 0.5  # prophet: commit the rest once every top-1 leads its top-2 by this
    credit: float = 2.0  # credit: decide positions whose accumulated probability reaches this
    decay: float = 0.8  # credit: weight of the previous calls' credit

    def check(self) -> None:
        if self.depth < 1 or not 0.0 < self.threshold <= 1.0 or not 0.0 <= self.margin <= 1.0 \
                or not 0.0 <= self.gate <= 1.0:
            raise InputError("diffusion options: depth >= 1, threshold in (0, 1], margin and "
                             f"gate in [0, 1] (got {self})")
        if self.credit <= 0.0 or not 0.0 <= self.decay < 1.0:
            raise InputError(f"diffusion options: credit > 0, decay in [0, 1) (got {self})")


# ------------------------------------------------------------------ one block's state


@dataclass
class Block:
    """The block being decoded: its tokens (mask id where undecided) and decisions made."""

    index: int
    tokens: np.ndarray
    mask_id: int
    decisions: int = 0

    @property
    def masked(self) -> np.ndarray:
        return self.tokens == self.mask_id

    @property
    def done(self) -> bool:
        return not self.masked.any()

    def decided(self, positions, tokens) -> Block:
        """A copy with ``tokens`` at ``positions``, counted as that many decisions."""
        new = self.tokens.copy()
        new[positions] = tokens
        return Block(self.index, new, self.mask_id, self.decisions + len(np.atleast_1d(positions)))


@dataclass(frozen=True)
class Choices:
    """Per block position: the token a decision there would take, and its probability
    (the position's confidence)."""

    tokens: np.ndarray
    confidence: np.ndarray


class Scores:
    """One state's block logits as distributions (computed once, whatever decisions are
    then taken from them), and the decisions."""

    def __init__(self, logits: np.ndarray, chooser: Chooser):
        self.chooser = chooser
        z = logits.astype(np.float32 if chooser.sampling.greedy else np.float64)
        z[:, chooser.contract.mask_id] = -np.inf  # a decision never picks the mask
        if chooser.sampling.greedy:
            self.p = np.exp(z - z.max(axis=-1, keepdims=True))
            self.p /= self.p.sum(axis=-1, keepdims=True)
            self.greedy = Choices(np.argmax(z, axis=-1), self.p.max(axis=-1))
        else:
            self.p = probabilities(z, chooser.sampling)

    def choices(self, block: Block, decision: int) -> Choices:
        """Each position's token and confidence, with the noise of ``decision`` (keyed by
        the seed and ``block``'s index, so any policy in the same state draws the same)."""
        if self.chooser.sampling.greedy:
            return self.greedy
        rng = np.random.default_rng([self.chooser.seed, block.index, decision])
        with np.errstate(divide="ignore"):
            tokens = np.argmax(np.log(self.p) + rng.gumbel(size=self.p.shape), axis=-1)
        return Choices(tokens, np.take_along_axis(self.p, tokens[:, None], axis=-1)[:, 0])

    def reference(self, block: Block) -> tuple[int, int]:
        """``mdm``'s decision from ``block``'s state with these logits: (position, token)."""
        return self.decision(block)[:2]

    def decision(self, block: Block) -> tuple[int, int, float]:
        """`reference`, with the decided token's probability."""
        choices = self.choices(block, block.decisions)
        position = _most_confident(choices.confidence, block.masked)
        return position, int(choices.tokens[position]), float(choices.confidence[position])

    def leads_by(self, rows: np.ndarray, margin: float) -> bool:
        """Whether every one of ``rows`` has its top-1 probability ahead of its top-2 by at
        least ``margin``. The top-1 alone bounds the lead, so the partition (a pass over the
        vocabulary, costly next to a step) runs only for rows that clear that bound."""
        p = self.p[rows]
        if (p.max(axis=-1) < margin).any():
            return False
        top2 = np.partition(p, -2, axis=-1)[:, -2:]
        return bool((top2[:, 1] - top2[:, 0] >= margin).all())


@dataclass(frozen=True)
class Chooser:
    """How decisions are taken: greedy or sampled, with the generation's seed."""

    contract: BlockDiffusion
    sampling: SamplingConfig
    seed: int

    def __call__(self, logits: np.ndarray) -> Scores:
        return Scores(logits, self)


def _most_confident(confidence: np.ndarray, masked: np.ndarray) -> int:
    return int(np.argmax(np.where(masked, confidence, -1.0)))  # ties: the lower position


# ------------------------------------------------------------------ the step calls


class BlockCaller:
    """Builds a call's inputs (pending previous block + candidates), runs it, commits the
    previous block, and returns each candidate's block logits."""

    def __init__(self, step: StepFunction, cache: KVCache, contract: BlockDiffusion,
                 chunk: int, stats: GenerationStats):
        self.step, self.cache, self.contract, self.stats = step, cache, contract, stats
        self.chunk = chunk  # the most tokens a call takes
        self.first_logits: np.ndarray | None = None  # the prefix's prediction for position 0

    @property
    def room(self) -> int:
        """How many candidates one more call (with no pending block) can take."""
        free = min(self.cache.max_seq - self.cache.length, self.chunk)
        return free // self.contract.block_size

    def __call__(self, pending: np.ndarray | None, candidates: list[Block]) -> list[np.ndarray]:
        size, clean = self.contract.block_size, 0 if pending is None else len(pending)
        tokens = np.concatenate([pending if pending is not None else np.zeros(0, np.int64),
                                 *[c.tokens for c in candidates]])
        n = len(tokens)
        past = self.cache.past_for(n)
        start = self.cache.length
        positions = start + np.concatenate(
            [np.arange(clean), *[clean + np.arange(size)] * len(candidates)])
        mask = np.zeros((n, past.shape[4] + n), dtype=bool)
        mask[:, : past.shape[4]] = self.cache.valid_mask()
        new = mask[:, past.shape[4]:]
        new[:clean, :clean] = np.tri(clean, dtype=bool)
        for i in range(len(candidates)):
            rows = slice(clean + i * size, clean + (i + 1) * size)
            new[rows, :clean] = True
            new[rows, rows] = True
        out = self.step(tokens[None].astype(np.int64), positions[None], past, mask[None])
        self.stats.steps += 1
        logits = out["logits"][0]
        if clean:
            self.cache.commit(out["present"], np.arange(clean))
            self.first_logits = logits[clean - 1]
        return [self._block_logits(logits[clean + i * size : clean + (i + 1) * size])
                for i in range(len(candidates))]

    def _block_logits(self, rows: np.ndarray) -> np.ndarray:
        if self.contract.shift == 0:
            return rows
        return np.concatenate([self.first_logits[None], rows[:-1]])


# ------------------------------------------------------------------ unmasking rules


@dataclass
class Decided:
    """What a rule did with one call's logits: the block's new state, and the logits of
    that state if the call computed them (else the next call must)."""

    block: Block
    logits: np.ndarray | None


class UnmaskingRule:
    """Decides positions of a block from its current state's logits, making calls of its
    own (``freedave``'s candidates) through ``call`` if it needs them."""

    def __init__(self, chooser: Chooser, options: DiffusionOptions):
        self.chooser, self.options = chooser, options

    def start_block(self) -> None:
        """A fresh block begins (rules that keep per-block state reset it)."""

    def decide(self, block: Block, logits: np.ndarray, call: BlockCaller) -> Decided:
        raise NotImplementedError


class Reference(UnmaskingRule):
    def decide(self, block, logits, call):
        position, token = self.chooser(logits).reference(block)
        return Decided(block.decided(position, token), None)


class FreeDave(UnmaskingRule):
    def decide(self, block, logits, call):
        drafts, stale = [block], self.chooser(logits)
        for _ in range(min(self.options.depth, int(block.masked.sum()), max(call.room, 1))):
            position, token, confidence = stale.decision(drafts[-1])
            if len(drafts) > 1 and confidence < self.options.gate:
                break  # an unlikely draft costs a candidate's rows and is rarely kept
            drafts.append(drafts[-1].decided(position, token))
        # The first draft is the reference's own decision; a complete block needs no logits.
        evaluate = [d for d in drafts[1:] if not d.done]
        if not evaluate:
            return Decided(drafts[-1], None)
        found = call(None, evaluate)
        state, state_logits = drafts[1], found[0]
        for j in range(1, len(drafts) - 1):
            if self.chooser(found[j - 1]).reference(drafts[j]) != _last_decision(drafts[j],
                                                                                 drafts[j + 1]):
                break
            state = drafts[j + 1]
            state_logits = found[j] if j < len(found) else None
        call.stats.accepted_depth.append(state.decisions - block.decisions)
        return Decided(state, state_logits)


def _last_decision(before: Block, after: Block) -> tuple[int, int]:
    position = int(np.flatnonzero(before.tokens != after.tokens)[0])
    return position, int(after.tokens[position])


class Threshold(UnmaskingRule):
    def decide(self, block, logits, call):
        choices = self.chooser(logits).choices(block, block.decisions)
        masked = block.masked
        chosen = masked & (choices.confidence >= self.options.threshold)
        chosen[_most_confident(choices.confidence, masked)] = True
        return Decided(block.decided(np.flatnonzero(chosen), choices.tokens[chosen]), None)


class Prophet(UnmaskingRule):
    def decide(self, block, logits, call):
        scores = self.chooser(logits)
        choices, masked = scores.choices(block, block.decisions), block.masked
        if scores.leads_by(masked, self.options.margin):
            return Decided(block.decided(np.flatnonzero(masked), choices.tokens[masked]), None)
        position = _most_confident(choices.confidence, masked)
        return Decided(block.decided(position, choices.tokens[position]), None)


class Credit(UnmaskingRule):
    def start_block(self) -> None:
        self.top: np.ndarray | None = None
        self.credit: np.ndarray | None = None

    def decide(self, block, logits, call):
        choices = self.chooser(logits).choices(block, block.decisions)
        if self.top is None:
            self.top, self.credit = choices.tokens, np.zeros(len(choices.tokens))
        same = choices.tokens == self.top
        self.credit = np.where(same, self.options.decay * self.credit, 0.0) + choices.confidence
        self.top = choices.tokens
        masked = block.masked
        chosen = masked & (self.credit >= self.options.credit)
        chosen[_most_confident(choices.confidence, masked)] = True
        return Decided(block.decided(np.flatnonzero(chosen), choices.tokens[chosen]), None)


# ------------------------------------------------------------------ the loop


@dataclass
class _Emission:
    """Cuts the decoded blocks at EOS and the budgets."""

    stop: StopConfig
    room: int  # new tokens the context holds
    emitted: int = 0
    reason: StopReason | None = field(default=None)

    def take(self, tokens: list[int]) -> list[int]:
        budget = min(self.stop.max_new_tokens, self.room) - self.emitted
        out = []
        for t in tokens[:budget]:
            out.append(t)
            if t in self.stop.eos_ids:
                self.reason = StopReason.EOS
                break
        self.emitted += len(out)
        if self.reason is None and self.emitted >= self.stop.max_new_tokens:
            self.reason = StopReason.MAX_NEW_TOKENS
        elif self.reason is None and self.emitted >= self.room:
            self.reason = StopReason.MAX_SEQ
        return out


def decode_blocks(step: StepFunction, cache: KVCache, prompt: list[int], chunk: int,
                  contract: BlockDiffusion, rule: UnmaskingRule, stop: StopConfig,
                  stats: GenerationStats) -> Iterator[list[int]]:
    """Yield each completed block's tokens (cut at EOS and the budgets) until generation
    ends; ``stats.stop_reason`` says why. A block that would not fit max_seq is not begun:
    generation then ends at the context's end (`StopReason.MAX_SEQ`)."""
    out = timed_prefill(step, cache, prompt, chunk, stats)
    start = time.perf_counter()
    size = contract.block_size
    caller = BlockCaller(step, cache, contract, chunk, stats)
    caller.first_logits = out["logits"][0, -1]
    emission = _Emission(stop, cache.max_seq - len(prompt))
    pending: np.ndarray | None = None
    index = 0
    while emission.reason is None:
        if cache.max_seq - cache.length - (0 if pending is None else size) < size:
            emission.reason = StopReason.MAX_SEQ  # the block would not fit the context
            break
        block = Block(index, np.full(size, contract.mask_id, np.int64), contract.mask_id)
        rule.start_block()
        logits = caller(pending, [block])[0]
        while True:
            decided = rule.decide(block, logits, caller)
            block = decided.block
            if block.done:
                break
            logits = decided.logits if decided.logits is not None else caller(None, [block])[0]
        new = emission.take(block.tokens.tolist())
        stats.new_tokens += len(new)
        stats.emitted_per_step.append(len(new))
        stats.decode_s += time.perf_counter() - start
        yield new
        start = time.perf_counter()
        pending, index = block.tokens, index + 1
    stats.stop_reason = emission.reason
    stats.decode_s += time.perf_counter() - start
