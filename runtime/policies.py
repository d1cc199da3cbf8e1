"""Every decoding policy in one table: what an engine must hold to offer it, and its drafter.

A `PolicySpec` says which manifest sections and programs a policy reads, whether it drafts
(int8 engines cannot: the rule is written once, in `PolicySpec.offered_by`), how many
extra cache layers it keeps, and the factory that makes its drafter from a `DraftContext`.
The build lists an engine's policies from this table (`offered_policies`), the manifest
validates against it, `Engine` loads a policy's programs and makes its drafter from it,
and build-time measurement (`measured_drafter`) runs the very drafter the runtime will.

Adding a policy: its drafter in runtime/drafters/, one `Policy` member and one `PolicySpec`
below, its test (docs/extending.md).

No torch and no manifest import at run time (the manifest imports this module).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from leapc.ir.dims import ModelDims
from leapc.ir.errors import InputError
from leapc.ir.head_spec import HeadKind, HeadPlacement
from leapc.runtime.diffusion import Credit, FreeDave, Prophet, Reference, Threshold, UnmaskingRule
from leapc.runtime.drafters.base import ChildSampling, Drafter, NoDrafter
from leapc.runtime.drafters.cache_chain import LayerSkipDrafter
from leapc.runtime.drafters.draft_model import DraftModelDrafter, TreeShape, UnrolledChain
from leapc.runtime.drafters.early_exit import EarlyExitDrafter, KangarooDrafter
from leapc.runtime.drafters.heads import DynamicTree, HeadsDrafter
from leapc.runtime.drafters.lookahead import LookaheadConfig, LookaheadDrafter
from leapc.runtime.drafters.lookup import LookupDrafter
from leapc.runtime.drafters.recycle import RecycleDrafter
from leapc.runtime.drafters.retrieval import RetrievalConfig, RetrievalDrafter
from leapc.runtime.drafters.suffix import suffix_drafter
from leapc.runtime.drafters.swift import SwiftDrafter
from leapc.runtime.kv_cache import KVCache
from leapc.runtime.sampling import SamplingConfig
from leapc.runtime.step import DRAFTED, StepFunction, unrolled

if TYPE_CHECKING:
    from leapc.runtime.datastore import Datastore
    from leapc.runtime.manifest import Manifest


class Policy(str, enum.Enum):
    AR = "ar"
    LOOKUP = "lookup"  # prompt lookup (training-free, any engine)
    SUFFIX = "suffix"  # SuffixDecoding: suffix trie of the generation (training-free, any engine)
    RECYCLE = "recycle"  # token recycling (training-free, any engine)
    DRAFT = "draft"  # a draft model in its own program and KV cache (build --draft-model)
    LOOKAHEAD = "lookahead"  # Jacobi lookahead decoding (training-free, any engine)
    RETRIEVAL = "retrieval"  # REST datastore + prompt lookup (build --datastore)
    MEDUSA = "medusa"  # Medusa heads, static tree (build --heads K)
    MEDUSA_DYNAMIC = "medusa-dynamic"  # Medusa heads, EAGLE-2 dynamic tree
    HYDRA = "hydra"  # Hydra heads, static tree (build --heads K --head-kind hydra)
    HYDRA_DYNAMIC = "hydra-dynamic"  # Hydra heads, EAGLE-2 dynamic tree
    EARLY_EXIT = "early-exit"  # LayerSkip self-speculation from layer E's exit (build --exit-layer)
    KANGAROO = "kangaroo"  # exit + trained adapter, stop below a top-1 confidence (--train-adapter)
    LAYER_SKIP = "layer-skip"  # the model with some sublayers bypassed drafts (build --skip)
    SWIFT = "swift"  # layer skip choosing among the engine's skip sets while generating
    # Block-diffusion models (runtime/diffusion.py): how a block's masked positions unmask.
    MDM = "mdm"  # the reference: one position per call, the most confident
    FREEDAVE = "freedave"  # the reference's decisions drafted and verified (lossless)
    CONFIDENCE = "confidence"  # every position above a probability threshold (lossy)
    PROPHET = "prophet"  # the whole rest once every top-1 leads its top-2 (lossy)
    CREDIT = "credit"  # positions whose top-1 probability accumulates enough (lossy)


# `--policy auto`: the engine's tuned choice (`leapc build --tune`), or `ar` if untuned.
AUTO_POLICY = "auto"
DEFAULT_MAX_DRAFT = 8
# Early exit's chain length when the engine measured none (`--exit-layer E` without a sweep
# records this one): the bundled model's best at E = 4 (docs/decisions.md).
DEFAULT_EXIT_DEPTH = 3
# Layer skip's chain length when the engine measured none (bench/bench_self_spec.py).
DEFAULT_SKIP_DEPTH = 3
# swift's default stop: a chain stops below this draft top-1 probability (0.5 stopped the
# bundled model's skip chains at tau 1.4; bench/results/self_spec_bundled.md).
SWIFT_CONFIDENCE = 0.1


@dataclass(frozen=True)
class DraftOptions:
    """Per-policy drafting knobs (ignored by policies that do not use them)."""

    # Longest chain a drafter proposes per step; None: the policy's default (the engine's
    # measured best for early exit, else DEFAULT_MAX_DRAFT).
    max_draft: int | None = None
    ngram: int = 4  # prompt lookup: longest suffix n-gram matched
    adaptive: bool = False  # chain drafters: +2 / -1 draft length instead of max_draft
    matches: int = 1  # lookup: continuations of that many earlier occurrences, as a tree
    branching: tuple[int, ...] = ()  # draft model: children per node at depths 1, 2, ...
    confidence: float = 0.0  # draft model: expand only nodes with top-1 probability >= this
    children: ChildSampling = ChildSampling.WITHOUT_REPLACEMENT  # sampled trees: rule 4 or 3

    lookahead: LookaheadConfig = LookaheadConfig()  # window W, n-gram N, guesses G
    retrieval: RetrievalConfig = RetrievalConfig()  # datastore tree: nodes, n-gram, backoff
    dynamic: DynamicTree = DynamicTree()  # *-dynamic head policies: nodes kept, beam
    head_tree: tuple[tuple[int, ...], ...] = ()  # medusa / hydra: rank paths (() = the engine's)

    def draft_length(self, default: int = DEFAULT_MAX_DRAFT) -> int:
        return default if self.max_draft is None else self.max_draft

    def tree_shape(self) -> TreeShape:
        """The draft model's tree; also the check every policy's knobs get."""
        if self.draft_length() < 0 or self.ngram < 1 or self.matches < 1:
            raise InputError("max-draft must be >= 0, ngram and matches >= 1")
        if any(width < 1 for width in self.branching):
            raise InputError(f"draft-tree widths must be >= 1 (got {self.branching})")
        if not 0.0 <= self.confidence < 1.0:
            raise InputError(f"confidence must be in [0, 1) (got {self.confidence})")
        return TreeShape(self.draft_length(), self.branching, self.confidence, self.children)


@dataclass(frozen=True)
class DraftContext:
    """What a drafter factory is given for one generation."""

    manifest: Manifest  # the engine's facts: exit layer, heads, skip sets, max_new, ...
    program: Callable[[str], StepFunction]  # one of the engine's programs, by name
    cache: KVCache  # the target's: early exit and layer skip draft inside it
    sampling: SamplingConfig
    seed: int
    options: DraftOptions
    datastore: Callable[[], Datastore]  # read on first use (tens of MB)

    def rng(self, *stream: int) -> np.random.Generator:
        """The drafter's own random stream, apart from the loop's (``seed``)."""
        return np.random.default_rng([self.seed, *stream])


def _no_programs(_: Manifest) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class PolicySpec:
    drafter: Callable[[DraftContext], Drafter]
    sections: tuple[str, ...] = ()  # manifest sections the policy reads
    programs: Callable[[Manifest], tuple[str, ...]] = _no_programs  # run besides "full"
    heads: HeadKind | None = None  # the kind of decoding heads it drafts with
    # Verifies drafts in steps wider than one token (`Manifest.inexact_verification`).
    drafts: bool = True
    extra_layers: int = 0  # KV cache layers beyond the model's (Kangaroo's adapter rows)
    # Runs as a row of a batch (runtime/batching.py): its drafter neither drafts inside
    # the target's cache nor verifies through programs of its own.
    batches: bool = True
    # A block-diffusion policy: its unmasking rule (it has no drafter); None: autoregressive.
    unmasking: type[UnmaskingRule] | None = None

    def missing(self, manifest: Manifest) -> str | None:
        """Why ``manifest`` cannot offer this policy, or None if it can."""
        diffusion = manifest.model.diffusion is not None
        if diffusion != (self.unmasking is not None):
            return ("needs a block-diffusion model" if not diffusion else
                    "needs an autoregressive model (the engine's is a block-diffusion model)")
        if self.drafts and manifest.inexact_verification:
            return manifest.inexact_verification
        for section in self.sections:
            if getattr(manifest, section) is None:
                return f"needs {section}; the manifest has none"
        if self.heads is not None and manifest.heads.kind is not self.heads:
            return (f"needs {self.heads.value} heads (the engine's are "
                    f"{manifest.heads.kind.value})")
        for program in self.programs(manifest):
            if program not in manifest.programs:
                return f"needs program {program!r}; the manifest has none"
        return None


# ------------------------------------------------------------------ drafter factories


def _lookup(c: DraftContext) -> LookupDrafter:
    o = c.options
    return LookupDrafter(max_ngram=o.ngram, max_draft=o.draft_length(), adaptive=o.adaptive,
                         matches=o.matches)


def _recycle(c: DraftContext) -> RecycleDrafter:
    return RecycleDrafter(c.manifest.model.dims.vocab_size)


def _lookahead(c: DraftContext) -> LookaheadDrafter:
    config, chunk = c.options.lookahead, c.manifest.max_new
    if config.smallest_step > chunk:
        raise InputError(f"lookahead {config} needs steps of {config.smallest_step} tokens "
                         "(window and one n-gram); this engine's steps take at most "
                         f"{chunk}")
    return LookaheadDrafter(config, c.rng(2))


def _retrieval(c: DraftContext) -> RetrievalDrafter:
    return RetrievalDrafter(c.datastore(), c.options.retrieval,
                            max_draft=c.options.draft_length(), max_ngram=c.options.ngram)


def _draft_model(c: DraftContext) -> DraftModelDrafter:
    m = c.manifest
    return DraftModelDrafter(c.program("draft_model"), new_cache(m.draft_model.dims, m.max_seq),
                             m.max_new, c.sampling, c.rng(1), c.options.tree_shape(),
                             adaptive=c.options.adaptive, chain=_unrolled(c, "draft_model"))


def _unrolled(c: DraftContext, program: str) -> UnrolledChain | None:
    """``program``'s chain in one call, if the engine has it (engines built before it
    existed do not)."""
    name = unrolled(program)
    if name not in c.manifest.programs:
        return None
    return UnrolledChain(c.program(name), int(c.manifest.programs[name].output_shape(DRAFTED)[1]))


def _with_unrolled(drafting: str, *others: str) -> Callable[[Manifest], tuple[str, ...]]:
    """Programs a policy runs: the one it drafts with, ``others``, and the drafting one's
    chain if the engine has it."""
    chain = unrolled(drafting)
    return lambda m: (drafting, *others, *((chain,) if chain in m.programs else ()))


def _heads(dynamic: bool) -> Callable[[DraftContext], HeadsDrafter]:
    def make(c: DraftContext) -> HeadsDrafter:
        heads, tree_options = c.manifest.heads, c.options.dynamic
        if tree_options.total < 1 or tree_options.beam < 1:
            raise InputError(f"dynamic tree needs nodes and beam >= 1 (got {tree_options})")
        tree = c.options.head_tree or heads.tree
        if max(map(len, tree), default=0) > heads.num_heads:
            raise InputError(f"a head tree of depth {max(map(len, tree))} needs more than "
                             f"this engine's {heads.num_heads} heads")
        program = c.program("heads") if heads.placement is HeadPlacement.PROGRAM else None
        return HeadsDrafter(heads.kind, heads.num_heads, heads.placement, program, tree,
                            tree_options if dynamic else None)
    return make


def _early_exit(c: DraftContext) -> EarlyExitDrafter:
    """The model's own first E layers and exit draft a chain in the target's cache; the
    remainder verifies it."""
    m, o = c.manifest, c.options
    depth = m.exit_choice.depth if m.exit_choice is not None else DEFAULT_EXIT_DEPTH
    return EarlyExitDrafter(c.program("draft"), c.cache, m.exit_layer, c.sampling, c.rng(1),
                            o.draft_length(depth), o.confidence, o.adaptive,
                            _unrolled(c, "draft"), remainder=c.program("remainder"))


def _kangaroo(c: DraftContext) -> KangarooDrafter:
    """Drafts through the adapter, stopping the chain at the first token whose top-1
    probability is below the confidence (its double exit). Defaults: the fastest point
    the build measured (an explicit depth and confidence need no measured adapter)."""
    m, o = c.manifest, c.options
    depth = o.max_draft if o.max_draft is not None else m.adapter.depth
    confidence = o.confidence or m.adapter.confidence
    return KangarooDrafter(c.program("kangaroo"), c.cache, m.exit_layer, c.sampling, c.rng(1),
                           depth, confidence, o.adaptive, remainder=c.program("remainder"),
                           chunk=m.max_new)


def _skip_drafter(c: DraftContext, index: int, confidence: float) -> LayerSkipDrafter:
    m, o = c.manifest, c.options
    return LayerSkipDrafter(c.program(f"skip_{index}"), c.cache, m.model.dims.num_layers, c.sampling,
                            c.rng(1, index), o.draft_length(m.skip_choice.depth), confidence,
                            o.adaptive)


def _layer_skip(c: DraftContext) -> LayerSkipDrafter:
    """Drafts with the engine's skip set."""
    return _skip_drafter(c, _chosen_skip(c.manifest), c.options.confidence)


def _swift(c: DraftContext) -> SwiftDrafter:
    """Drafts with the skip set that scores best on the recent window (the engine's at
    first), stopping chains below a confidence."""
    confidence = c.options.confidence or SWIFT_CONFIDENCE
    drafters = [_skip_drafter(c, i, confidence)
                for i in range(len(c.manifest.skip_choice.candidates))]
    return SwiftDrafter(drafters, c.program("full"), current=_chosen_skip(c.manifest),
                        chunk=c.manifest.max_new)


def _chosen_skip(m: Manifest) -> int:
    return m.skip_choice.candidates.index(m.skip)


def _chosen_skip_program(m: Manifest) -> tuple[str, ...]:
    """(none if the skip set is not a candidate: the manifest's own check says so)"""
    return tuple(f"skip_{i}" for i, s in enumerate(m.skip_choice.candidates) if s == m.skip)


def _all_skips(m: Manifest) -> tuple[str, ...]:
    return tuple(f"skip_{i}" for i in range(len(m.skip_choice.candidates)))


def _head_program(m: Manifest) -> tuple[str, ...]:
    return ("heads",) if m.heads.placement is HeadPlacement.PROGRAM else ()


# ------------------------------------------------------------------ the registry

POLICIES: Mapping[Policy, PolicySpec] = {
    Policy.AR: PolicySpec(lambda c: NoDrafter(), drafts=False),
    Policy.LOOKUP: PolicySpec(_lookup),
    Policy.SUFFIX: PolicySpec(suffix_drafter),
    Policy.RECYCLE: PolicySpec(_recycle),
    Policy.LOOKAHEAD: PolicySpec(_lookahead),
    Policy.DRAFT: PolicySpec(_draft_model, ("draft_model",), _with_unrolled("draft_model")),
    Policy.RETRIEVAL: PolicySpec(_retrieval, ("datastore",)),
    Policy.MEDUSA: PolicySpec(_heads(False), ("heads",), _head_program, HeadKind.MEDUSA),
    Policy.MEDUSA_DYNAMIC: PolicySpec(_heads(True), ("heads",), _head_program, HeadKind.MEDUSA),
    Policy.HYDRA: PolicySpec(_heads(False), ("heads",), _head_program, HeadKind.HYDRA),
    Policy.HYDRA_DYNAMIC: PolicySpec(_heads(True), ("heads",), _head_program, HeadKind.HYDRA),
    Policy.EARLY_EXIT: PolicySpec(_early_exit, ("exit_layer",),
                                  _with_unrolled("draft", "remainder"), batches=False),
    Policy.KANGAROO: PolicySpec(_kangaroo, ("exit_layer", "adapter"),
                                lambda m: ("kangaroo", "remainder"), extra_layers=1,
                                batches=False),
    Policy.LAYER_SKIP: PolicySpec(_layer_skip, ("skip", "skip_choice"), _chosen_skip_program,
                                  batches=False),
    Policy.SWIFT: PolicySpec(_swift, ("skip", "skip_choice"), _all_skips, batches=False),
    **{policy: PolicySpec(lambda c: NoDrafter(), batches=False, unmasking=rule,
                          drafts=policy is Policy.FREEDAVE)
       for policy, rule in ((Policy.MDM, Reference), (Policy.FREEDAVE, FreeDave),
                            (Policy.CONFIDENCE, Threshold), (Policy.PROPHET, Prophet),
                            (Policy.CREDIT, Credit))},
}


def offered_policies(manifest: Manifest) -> tuple[Policy, ...]:
    """Every policy ``manifest``'s sections and programs can run, in `Policy` order."""
    return tuple(p for p in Policy if POLICIES[p].missing(manifest) is None)


def required_programs(manifest: Manifest, policy: Policy) -> tuple[str, ...]:
    return ("full", *POLICIES[policy].programs(manifest))


def new_cache(dims: ModelDims, max_seq: int, extra_layers: int = 0) -> KVCache:
    return KVCache(dims.num_layers, dims.num_kv_heads, dims.head_dim, dims.dtype, max_seq,
                   extra_layers=extra_layers)


def measured_drafter(policy: Policy, manifest: Manifest, programs: Mapping[str, StepFunction],
                     options: DraftOptions) -> Callable[[KVCache], Drafter]:
    """For build-time measurement (`leapc.measure`): the drafter the runtime will make, over
    a candidate's programs and facts (``manifest``: the engine so far, with the candidate's
    exit layer or skip set), greedy."""
    def make(cache: KVCache) -> Drafter:
        context = DraftContext(manifest, programs.__getitem__, cache, SamplingConfig(), 0,
                               options, _no_datastore)
        return POLICIES[policy].drafter(context)
    return make


def _no_datastore() -> Datastore:
    raise RuntimeError("measured_drafter: a build-time measurement has no datastore")
