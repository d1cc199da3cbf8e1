"""``torch.ops.leapc.verify_greedy``: the longest accepted path of a token tree under greedy
decoding (DESIGN §7, rule 1), from the target's argmax at every node.

`leapc.kernels.reference.verify_greedy` states the exact semantics, which are those of
`leapc.runtime.acceptance.accept_deterministic` with greedy sampling, including the tie
rule: of several children that match, the one with the smallest index is taken. The op
returns ``(path [B, N], length [B])``, the path padded with -1, so that it feeds
`leapc::kv_commit` directly: ``kv_commit(cache, present, path, past_len)``.

Its Triton kernel, registered for CUDA tensors where triton is installed, is in
`leapc.kernels.triton_verify_greedy`.
"""

from __future__ import annotations

import torch

from leapc.kernels import reference, triton_installed


def check_shapes(target, tokens, parents) -> None:
    """The static part of the contract: three ``[B, N]`` tensors."""
    if (target.ndim, tokens.ndim, parents.ndim) != (2, 2, 2):
        raise ValueError(f"verify_greedy: target {tuple(target.shape)}, tokens "
                         f"{tuple(tokens.shape)}, parents {tuple(parents.shape)} are not "
                         f"all [B, N]")


verify_greedy = torch.library.custom_op("leapc::verify_greedy", mutates_args=())(
    reference.verify_greedy
)


@verify_greedy.register_fake
def _(target, tokens, parents):
    check_shapes(target, tokens, parents)
    batch, new = tokens.shape
    path = tokens.new_empty(batch, new, dtype=torch.int64)
    return path, tokens.new_empty(batch, dtype=torch.int64)


def triton_kernel(target, tokens, parents):
    """The CUDA implementation. The kernel module is imported at the first launch, not with
    the declaration (see `leapc.kernels.triton_installed`)."""
    from leapc.kernels.triton_verify_greedy import verify_greedy as launch

    return launch(target, tokens, parents)


if triton_installed():
    verify_greedy.register_kernel("cuda")(triton_kernel)
