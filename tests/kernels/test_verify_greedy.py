"""``leapc.verify_greedy``: the reference against the runtime's greedy acceptance
(`leapc.runtime.acceptance`, rule 1), and the op's declaration under export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from trees import greedy_step, random_tree

import leapc.kernels.verify_greedy  # noqa: F401  (declares torch.ops.leapc.verify_greedy)
from leapc.ir.tree import tree_from_parents
from leapc.kernels import reference
from leapc.runtime.acceptance import accept_deterministic
from leapc.runtime.sampling import SamplingConfig

GREEDY = SamplingConfig()


def runtime_acceptance(target, tokens, parents):
    """Per row, the runtime's ``(path, emitted)``, fed logits whose argmax is ``target``."""
    results = []
    for row_target, row_tokens, row_parents in zip(target, tokens, parents, strict=True):
        logits = np.eye(int(row_target.max()) + 1)[row_target.numpy()]  # one-hot rows
        results.append(accept_deterministic(row_tokens.numpy(), tree_from_parents(row_parents),
                                            logits, GREEDY, np.random.default_rng(0)))
    return results


def unpadded(path, length):
    return [row[:n].tolist() for row, n in zip(path, length.tolist(), strict=True)]


@pytest.mark.parametrize("size", [1, 2, 5, 12])
@pytest.mark.parametrize("vocab", [2, 3])
def test_reference_equals_runtime_acceptance(size, vocab):
    """Paths and emitted tokens (``target`` along the path), over 50 random trees each."""
    g = torch.Generator().manual_seed(size * vocab)
    target, tokens, parents = greedy_step([random_tree(size, g) for _ in range(50)], vocab, g)
    path, length = reference.verify_greedy(target, tokens, parents)
    want = runtime_acceptance(target, tokens, parents)
    assert unpadded(path, length) == [p for p, _ in want]
    emitted = [row_target[row].tolist()
               for row_target, row in zip(target, unpadded(path, length), strict=True)]
    assert emitted == [e for _, e in want]
    assert (path[torch.arange(size)[None, :] >= length[:, None]] == -1).all()


def test_first_matching_child_is_taken():
    """Nodes 1 and 2 both carry the root's argmax: the runtime and the op take node 1,
    although only node 2's subtree would have accepted more."""
    parents = torch.tensor([[-1, 0, 0, 2]])
    tokens, target = torch.tensor([[9, 5, 5, 7]]), torch.tensor([[5, 0, 7, 0]])
    path, length = reference.verify_greedy(target, tokens, parents)
    assert unpadded(path, length) == [[0, 1]]
    assert runtime_acceptance(target, tokens, parents)[0][0] == [0, 1]


def test_padding_nodes_are_never_reached():
    """A 3-node tree padded to 6 with parent -1: its matching padding tokens are no one's
    children."""
    parents = torch.tensor([[-1, 0, 1, -1, -1, -1]])
    tokens, target = torch.tensor([[4, 4, 4, 4, 4, 4]]), torch.full((1, 6), 4)
    path, length = reference.verify_greedy(target, tokens, parents)
    assert path.tolist() == [[0, 1, 2, -1, -1, -1]]
    assert length.tolist() == [3]


def test_op_runs_the_reference_on_cpu():
    g = torch.Generator().manual_seed(0)
    inputs = greedy_step([random_tree(9, g) for _ in range(4)], 2, g)
    for got, want in zip(torch.ops.leapc.verify_greedy(*inputs),
                         reference.verify_greedy(*inputs), strict=True):
        assert torch.equal(got, want)


def test_fake_implementation_gives_shapes_and_refuses_bad_ranks():
    with FakeTensorMode() as mode:
        path, length = torch.ops.leapc.verify_greedy(
            *(mode.from_tensor(torch.zeros(3, 7, dtype=torch.int64)) for _ in range(3)))
        assert (path.shape, length.shape) == ((3, 7), (3,))
        with pytest.raises(ValueError, match=r"are not all \[B, N\]"):
            torch.ops.leapc.verify_greedy(mode.from_tensor(torch.zeros(7, dtype=torch.int64)),
                                          *(mode.from_tensor(torch.zeros(3, 7)) for _ in range(2)))
