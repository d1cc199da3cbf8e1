"""The Triton ``verify_greedy`` kernel against the reference: single-node trees, random
trees, fully accepted deep chains, tied siblings, padded rows, strided inputs.

On the CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from trees import greedy_step, random_tree, stack_parents

from leapc.ir.tree import chain, tree_from_parents

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it on Linux)")

from leapc.kernels import reference  # noqa: E402
from leapc.kernels import verify_greedy as declaration  # noqa: E402
from leapc.kernels.triton_verify_greedy import verify_greedy  # noqa: E402


def assert_matches_reference(inputs, device):
    got = verify_greedy(*(t.to(device) for t in inputs))
    want = reference.verify_greedy(*inputs)
    assert [t.tolist() for t in got] == [t.tolist() for t in want]


@pytest.mark.parametrize("size", [1, 2, 7, 33])
def test_random_trees_match_reference(triton_device, size):
    g = torch.Generator().manual_seed(size)
    inputs = greedy_step([random_tree(size, g) for _ in range(6)], 2, g)
    assert_matches_reference(inputs, triton_device)


def test_deep_chain_accepted_to_the_end(triton_device):
    """A 63-token chain whose every token is the target's argmax at its parent."""
    parents = stack_parents([chain(63)])
    target = torch.randint(0, 50, (1, 64), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([torch.tensor([[7]]), target[:, :-1]], dim=1)
    path, length = verify_greedy(*(t.to(triton_device) for t in (target, tokens, parents)))
    assert length.tolist() == [64]
    assert path.tolist() == [list(range(64))]


def test_tied_siblings_and_padded_rows_match_reference(triton_device):
    """Row 0: the root's children 1, 2 and 3 all match (the first is taken). Row 1: a
    3-node chain padded with parent -1 nodes whose tokens would match."""
    parents = torch.tensor([[-1, 0, 0, 0, 2, 3], [-1, 0, 1, -1, -1, -1]])
    tokens = torch.tensor([[0, 4, 4, 4, 1, 1], [0, 4, 4, 4, 4, 4]])
    target = torch.tensor([[4, 1, 1, 1, 0, 0], [4, 4, 4, 4, 4, 4]])
    assert_matches_reference((target, tokens, parents), triton_device)
    path, length = verify_greedy(*(t.to(triton_device) for t in (target, tokens, parents)))
    assert length.tolist() == [2, 3]


def test_strided_inputs_match_reference(triton_device):
    g = torch.Generator().manual_seed(1)
    trees = [tree_from_parents([-1, 0, 0, 1, 1, 2, 3, 3])] * 4
    target, tokens, parents = greedy_step(trees, 2, g)
    target = target.T.contiguous().T  # column-major: strides (1, B)
    assert not target.is_contiguous()
    assert_matches_reference((target, tokens, parents), triton_device)


def test_cuda_registration_launches_this_kernel(triton_device):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("leapc::verify_greedy", "CUDA")
    g = torch.Generator().manual_seed(2)
    inputs = [t.to(triton_device) for t in greedy_step([random_tree(9, g)] * 3, 2, g)]
    got, want = declaration.triton_kernel(*inputs), verify_greedy(*inputs)
    assert [t.tolist() for t in got] == [t.tolist() for t in want]
