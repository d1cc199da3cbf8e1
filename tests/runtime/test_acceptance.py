"""The exact acceptance rules (DESIGN §7) on a small-vocabulary model whose distributions
are known in closed form: a Markov chain over 6 tokens, target p(next | token) and a
different draft q(next | token). Whatever tree a drafter proposes, the first two tokens a
step emits (continued by plain sampling when the step emits one) must follow p exactly:
a chi-square goodness-of-fit test with 10k samples, alpha = 0.001, for a peaked and a flat
target. Negative controls show the test detects a wrong rule.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from stats import chi2_critical, chi2_goodness_of_fit

from leapc.ir.tree import tree_from_parents
from leapc.runtime.acceptance import accept, accept_tree_sampling
from leapc.runtime.drafters.base import ChildSampling, Draft
from leapc.runtime.sampling import SamplingConfig, probabilities, sample_distinct

VOCAB = 6
SAMPLES = 10_000
ROOT = 0
SHARPNESS = {"peaked": 3.0, "flat": 0.5}  # scale of the target's logits


class MarkovModel:
    """Target and draft next-token logits given the current token."""

    def __init__(self, sharpness: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.target = sharpness * rng.normal(size=(VOCAB, VOCAB))
        self.draft = self.target + rng.normal(size=(VOCAB, VOCAB))  # q near p, not equal

    def exact_pairs(self, cfg: SamplingConfig) -> dict:
        p = probabilities(self.target, cfg)
        return {(a, b): p[ROOT, a] * p[a, b] for a, b in itertools.product(range(VOCAB), repeat=2)}


def draft_tree(model: MarkovModel, branching: tuple[int, ...], cfg: SamplingConfig,
               children: ChildSampling | None, rng: np.random.Generator) -> Draft:
    """Expand ``branching[d]`` children per node at depth d: drawn i.i.d. or distinct from
    q, or (``children=None``) the top candidates of q, fixed before the target is seen."""
    q_table = probabilities(model.draft, cfg)
    tokens, parents, q_rows, frontier = [ROOT], [-1], [np.zeros(VOCAB)], [0]
    for width in branching:
        grown = []
        for node in frontier:
            q = q_table[tokens[node]]
            if children is None:
                drawn = np.argsort(-q, kind="stable")[:width]
            elif children is ChildSampling.IID:
                drawn = rng.choice(VOCAB, size=width, p=q)
            else:
                drawn = sample_distinct(q, width, rng)
            for token in drawn:
                grown.append(len(tokens))
                tokens.append(int(token))
                parents.append(node)
                q_rows.append(q)
        frontier = grown
    q = None if children is None else np.stack(q_rows)
    return Draft(np.asarray(tokens), tree_from_parents(np.asarray(parents)), q,
                 children or ChildSampling.WITHOUT_REPLACEMENT)


def first_two_tokens(model: MarkovModel, draft: Draft, cfg: SamplingConfig, rng, rule=accept):
    logits = model.target[draft.tokens]  # the target's logits at every node
    if rule is accept:
        _, emitted = accept(draft, logits, cfg, rng)
    else:
        _, emitted = rule(draft.tokens, draft.tree, draft.q, logits, cfg, rng)
    while len(emitted) < 2:  # continue by plain sampling from p
        emitted.append(int(rng.choice(VOCAB, p=probabilities(model.target[emitted[-1]], cfg))))
    return tuple(emitted[:2])


def goodness_of_fit(model, branching, cfg, children, seed, rule=accept) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    pairs = [first_two_tokens(model, draft_tree(model, branching, cfg, children, rng), cfg,
                              rng, rule) for _ in range(SAMPLES)]
    stat, df = chi2_goodness_of_fit(pairs, model.exact_pairs(cfg))
    assert df >= 5, "the test needs a distribution with several outcomes"
    return stat, chi2_critical(df)


RULES = {  # rule number -> (tree shape, how children are drawn)
    2: ((1, 1, 1), ChildSampling.IID),  # a sampled chain
    3: ((3, 2), ChildSampling.IID),
    4: ((3, 2), ChildSampling.WITHOUT_REPLACEMENT),
    5: ((2, 2), None),  # deterministic candidates
}
CONFIGS = {"t1": SamplingConfig(1.0), "t0.7-top4": SamplingConfig(0.7, top_k=4),
           "top-p0.9": SamplingConfig(1.0, top_p=0.9)}


@pytest.mark.parametrize("shape", SHARPNESS)
@pytest.mark.parametrize("rule", RULES)
def test_rule_emits_exactly_the_target_distribution(rule, shape):
    model = MarkovModel(SHARPNESS[shape])
    branching, children = RULES[rule]
    stat, critical = goodness_of_fit(model, branching, CONFIGS["t1"], children, seed=rule)
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize("config", ["t0.7-top4", "top-p0.9"])
def test_rule_4_is_exact_after_truncation(config):
    """p and q both truncated by top-k / top-p: support mismatches reach the residual."""
    model = MarkovModel(SHARPNESS["flat"], seed=1)
    stat, critical = goodness_of_fit(model, (3, 2), CONFIGS[config],
                                     ChildSampling.WITHOUT_REPLACEMENT, seed=7)
    assert stat < critical, (stat, critical)


def iid_rule_on_distinct_children(tokens, tree, q, logits, cfg, rng):
    return accept_tree_sampling(tokens, tree, q, logits, cfg, rng, without_replacement=False)


def test_the_test_detects_rule_3_applied_to_children_drawn_without_replacement():
    model = MarkovModel(SHARPNESS["peaked"])
    stat, critical = goodness_of_fit(model, (3, 2), CONFIGS["t1"],
                                     ChildSampling.WITHOUT_REPLACEMENT, seed=3,
                                     rule=iid_rule_on_distinct_children)
    assert stat > critical, (stat, critical)


def test_the_test_detects_a_rule_that_ignores_the_residual():
    def accept_then_plain_sample(tokens, tree, q, logits, cfg, rng):
        path, emitted = accept_tree_sampling(tokens, tree, q, logits, cfg, rng, True)
        if len(path) == 1:  # rejected at the root: a plain draw from p instead of the residual
            emitted = [int(rng.choice(VOCAB, p=probabilities(logits[0], cfg)))]
        return path, emitted

    model = MarkovModel(SHARPNESS["flat"])
    stat, critical = goodness_of_fit(model, (2, 1), CONFIGS["t1"],
                                     ChildSampling.WITHOUT_REPLACEMENT, seed=4,
                                     rule=accept_then_plain_sample)
    assert stat > critical, (stat, critical)


def test_greedy_follows_the_argmax_through_a_tree():
    model = MarkovModel(SHARPNESS["flat"])
    draft = draft_tree(model, (3, 3), SamplingConfig(1.0), ChildSampling.WITHOUT_REPLACEMENT,
                       np.random.default_rng(0))
    path, emitted = accept(draft, model.target[draft.tokens], SamplingConfig(0.0),
                           np.random.default_rng(0))
    expected, token = [], ROOT
    for _ in range(len(emitted)):
        token = int(np.argmax(model.target[token]))
        expected.append(token)
    assert emitted == expected
    assert [int(draft.tokens[n]) for n in path[1:]] == emitted[:-1]


def test_sample_distinct_follows_successive_draws_without_replacement():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    rng = np.random.default_rng(0)
    draws = [tuple(sample_distinct(p, 2, rng)) for _ in range(SAMPLES)]
    exact = {(a, b): p[a] * p[b] / (1 - p[a]) for a in range(3) for b in range(3) if a != b}
    stat, df = chi2_goodness_of_fit(draws, exact)
    assert stat < chi2_critical(df)
    assert len(sample_distinct(p, 4, rng)) == 3  # never a token outside the support
