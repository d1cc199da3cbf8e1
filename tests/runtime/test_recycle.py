"""Token recycling: successor-table updates and template walks."""

from __future__ import annotations

import numpy as np

from leapc.runtime.drafters.base import Draft, Verification
from leapc.runtime.drafters.recycle import RecycleDrafter


def test_unobserved_tokens_draft_nothing():
    drafter = RecycleDrafter(vocab_size=10, template=((0,), (1,), (0, 0)))
    assert drafter.propose([1, 2], 3, budget=8).tokens.tolist() == [3]


def test_observed_logits_become_ranked_successors_and_the_template_is_walked():
    drafter = RecycleDrafter(vocab_size=10, template=((0,), (1,), (0, 0), (1, 0)))
    logits = np.zeros((2, 10))
    logits[0, [7, 4]] = [5.0, 3.0]  # after token 3: 7 then 4
    logits[1, [2]] = [1.0]  # after token 7: 2 first
    draft = Draft(np.array([3, 7]), Draft.chain_of(3, [7]).tree)
    drafter.observe([3, 7], Verification(draft, logits, [0, 1], [7, 2]))
    assert drafter.table[3].tolist() == [7, 4]
    proposal = drafter.propose([], 3, budget=8)
    # root 3 -> (7, 4); 7 -> 2; 4 was never observed: no grandchild under it
    assert proposal.tokens.tolist() == [3, 7, 4, 2]
    assert proposal.tree.parents.tolist() == [-1, 0, 0, 1]
    assert drafter.propose([], 3, budget=1).tokens.tolist() == [3, 7]
