"""HeadsDrafter trees, against fake head programs whose rankings are known."""

from __future__ import annotations

import numpy as np
import pytest

from leapc.ir.head_spec import HeadKind, HeadPlacement
from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.heads import DynamicTree, HeadsDrafter

V, H, K = 50, 4, 3


def medusa_logits() -> np.ndarray:
    """Head k ranks token 10k + r at rank r (probabilities falling with r)."""
    logits = np.full((K, V), -20.0, dtype=np.float32)
    for k in range(K):
        logits[k, 10 * k : 10 * k + 5] = [5.0, 4.0, 3.0, 2.0, 1.0]
    return logits


def medusa_program(hidden):
    return {"head_logits": np.repeat(medusa_logits()[:, None], len(hidden), axis=1)}


def hydra_program(hidden, tokens, head):
    """Head k under parent token p ranks (p + 1 + r) % V at rank r."""
    logits = np.full((1, len(tokens), V), -20.0, dtype=np.float32)
    for row, parent in enumerate(tokens):
        logits[0, row, (parent + 1 + np.arange(4)) % V] = [4.0, 3.0, 2.0, 1.0]
    return {"head_logits": logits}


def primed(drafter: HeadsDrafter) -> HeadsDrafter:
    draft = Draft.root_only(7)
    outputs = {"hidden": np.ones((1, 1, H), np.float32),
               "head_logits": medusa_logits()[:, None, None]}
    drafter.observe([1, 2], Verification(draft, np.zeros((1, V)), [0], [7], None, outputs))
    return drafter


def test_nothing_is_drafted_before_a_hidden_state_was_seen():
    drafter = HeadsDrafter(HeadKind.MEDUSA, K, HeadPlacement.PROGRAM, medusa_program, ((0,),))
    assert drafter.propose([1], 7, 10).tree.size == 1


@pytest.mark.parametrize("placement", HeadPlacement)
def test_medusa_static_tree_takes_each_depths_ranked_candidate(placement):
    tree = ((0,), (1,), (0, 0), (0, 2), (0, 0, 1))
    drafter = primed(HeadsDrafter(HeadKind.MEDUSA, K, placement, medusa_program, tree))
    draft = drafter.propose([1, 2], 7, 10)
    # nodes by depth then rank path: (), (0,), (1,), (0,0), (0,2), (0,0,1)
    assert draft.tokens.tolist() == [7, 0, 1, 10, 12, 21]
    assert draft.tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]


def test_static_tree_is_cut_to_the_budget_keeping_parents():
    tree = ((0,), (1,), (0, 0), (0, 2), (0, 0, 1))
    drafter = primed(HeadsDrafter(HeadKind.MEDUSA, K, HeadPlacement.PROGRAM, medusa_program,
                                  tree))
    draft = drafter.propose([1, 2], 7, 3)
    assert draft.tokens.tolist() == [7, 0, 1, 10]


def test_hydra_static_tree_reads_each_parents_token():
    tree = ((0,), (1,), (0, 0), (1, 1), (0, 0, 0))
    drafter = primed(HeadsDrafter(HeadKind.HYDRA, K, HeadPlacement.PROGRAM, hydra_program,
                                  tree))
    draft = drafter.propose([1, 2], 7, 10)
    # depth 1 under root 7: 8 (rank 0), 9 (rank 1); depth 2 under 8: 9; under 9: 11 (rank 1)
    assert draft.tokens.tolist() == [7, 8, 9, 9, 11, 10]


def test_dynamic_tree_keeps_the_best_nodes_and_their_ancestors():
    """Every head scores its ranks 0, 1, 2 at log-probs ~ -0.42, -1.42, -2.42: the six
    best paths are (0), (0,0), (0,0,0), (1), then (0,1) and (1,0) tied at -1.84."""
    drafter = primed(HeadsDrafter(HeadKind.MEDUSA, K, HeadPlacement.PROGRAM, medusa_program,
                                  dynamic=DynamicTree(total=6, beam=3)))
    draft = drafter.propose([1, 2], 7, 50)
    paths = sorted(tuple(int(draft.tokens[v]) for v in draft.tree.path_to(node)[1:])
                   for node in range(1, draft.tree.size))
    assert paths == [(0,), (0, 10), (0, 10, 20), (0, 11), (1,), (1, 10)]
    assert all(0 <= draft.tree.parents[v] < v for v in range(1, draft.tree.size))


def test_dynamic_tree_respects_the_step_budget():
    drafter = primed(HeadsDrafter(HeadKind.MEDUSA, K, HeadPlacement.PROGRAM, medusa_program,
                                  dynamic=DynamicTree(total=6, beam=3)))
    assert drafter.propose([1, 2], 7, 2).tree.size == 3


def test_a_tree_deeper_than_the_heads_is_refused():
    with pytest.raises(ValueError, match="more than the 3 heads"):
        HeadsDrafter(HeadKind.MEDUSA, K, HeadPlacement.PROGRAM, medusa_program,
                     ((0, 0, 0, 0),))


def test_the_first_draft_reads_the_last_prefill_row():
    drafter = HeadsDrafter(HeadKind.HYDRA, K, HeadPlacement.PROGRAM, hydra_program, ((0,),))
    seen = []

    def program(hidden, tokens, head):
        seen.append(hidden.copy())
        return hydra_program(hidden, tokens, head)

    drafter.program = program
    hidden = np.arange(3 * H, dtype=np.float32).reshape(1, 3, H)
    drafter.observe_prefill({"hidden": hidden})
    assert drafter.propose([1, 2, 3], 7, 10).tokens.tolist() == [7, 8]
    np.testing.assert_array_equal(seen[0][0], hidden[0, -1])
