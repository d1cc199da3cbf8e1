"""Pure-torch references of the leapc kernels: readable ground truth, no performance tricks.

Every optimised kernel (Triton, an ONNX translation) is tested against the function of
the same name here. They run on any device and in any floating dtype.
"""

from __future__ import annotations

import torch

from leapc.ir.capped_attention import soft_cap


def visible_keys(past_len: torch.Tensor, tree_mask: torch.Tensor, past: int) -> torch.Tensor:
    """``[B, N, T + N]`` bool: which keys each new token sees, from the compact form.

    Key ``j < T`` (a cache slot) is visible iff ``j < past_len[b]``: the runtime's cache is
    prefix-valid, so one length per row says everything the dense mask's past columns do.
    Key ``T + i`` (tree node ``i``) is visible to node ``n`` iff ``tree_mask[b, n, i]``.
    """
    batch, new, _ = tree_mask.shape
    slots = torch.arange(past, device=past_len.device)
    valid_past = slots[None, :] < past_len[:, None]  # [B, T]
    return torch.cat([valid_past[:, None, :].expand(batch, new, past), tree_mask], dim=-1)


def within_window(visible: torch.Tensor, window: int) -> torch.Tensor:
    """``visible`` (`visible_keys`) narrowed to the last ``window`` keys each row sees.

    A row's visible keys in order (valid cache slots, then its ancestors and itself) sit at
    positions 0, 1, ...: cache slot j holds position j, and the tree's node at depth d
    position ``past_len + d``. So "within ``window`` positions of the query, its own
    included" (`leapc.ir.capture`'s sliding window) is "among the row's last ``window``
    visible keys", a rule that reads nothing but the row's own visible list.
    """
    rank = visible.cumsum(dim=-1) - 1  # the key's place in its row's visible list
    return visible & (rank >= visible.sum(dim=-1, keepdim=True) - window)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_len: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> torch.Tensor:
    """Attention of N tree nodes over T cache slots plus the nodes themselves.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, T + N, D]``, ``v [B, Hkv, T + N, Dv]`` (cache
    slots first, then the N new tokens), ``past_len [B]`` int64, ``tree_mask [B, N, N]``
    bool with a True diagonal (a node sees itself). Returns ``[B, H, N, Dv]``. A nonzero
    ``softcap`` soft-caps the scaled scores before the mask, ``cap * tanh(s / cap)``
    (Gemma 2's attention logit soft-capping; `leapc.ir.capped_attention`). A nonzero
    ``window`` lets each node see only its last ``window`` visible keys (`within_window`).

    Grouped-query attention: query head ``h`` reads KV head ``h // G`` with
    ``G = H / Hkv`` (what ``repeat_kv`` and ``enable_gqa`` compute). Viewing the queries as
    ``[B, Hkv, G * N, D]`` lets every KV head serve its G query heads in one matmul
    without repeating keys and values in memory.

    Masked scores are ``-inf``, so ``exp`` gives them weight exactly 0: the same weights as
    the dense program, whose additive ``finfo.min`` also underflows to exactly 0 once the
    softmax subtracts the row maximum. That maximum is always a visible score (the
    diagonal), so no row is all ``-inf`` and the softmax never divides 0 by 0.
    """
    batch, heads, new, head_dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    grouped_q = q.reshape(batch, kv_heads, group * new, head_dim)
    scores = soft_cap((grouped_q @ k.transpose(-1, -2)) * scale, softcap)  # [B, Hkv, G*N, T+N]
    visible = visible_keys(past_len, tree_mask, total - new)  # [B, N, T + N]
    if window:
        visible = within_window(visible, window)
    scores = scores.view(batch, kv_heads, group, new, total)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    weights = scores.softmax(dim=-1).view(batch, kv_heads, group * new, total)
    return (weights @ v).view(batch, heads, new, v.shape[-1])


def check_commit(cache: torch.Tensor, present: torch.Tensor, rows: torch.Tensor,
                 start: torch.Tensor) -> None:
    """Refuse a commit that would read a node ``present`` lacks or write past the cache's
    end. Reads the indices on the host (one device sync): a GPU kernel cannot raise, and an
    out-of-bounds access there corrupts memory instead of failing."""
    new, capacity = present.shape[4], cache.shape[4]
    if bool((rows >= new).any()):
        raise ValueError(f"kv_commit: rows {rows.tolist()} name nodes beyond the step's {new}")
    offsets = torch.arange(rows.shape[1], device=rows.device)
    ends = torch.where(rows >= 0, start[:, None] + offsets + 1, 0)  # one past each write
    if rows.numel() and int(ends.max()) > capacity:
        raise ValueError(f"kv_commit: committing rows {rows.tolist()} at slots {start.tolist()} "
                         f"needs {int(ends.max())} slots; the cache holds {capacity}")


def kv_commit(cache: torch.Tensor, present: torch.Tensor, rows: torch.Tensor,
              start: torch.Tensor) -> None:
    """Write a step's accepted keys and values into the cache, in place.

    Shapes: ``cache [L, 2, B, Hkv, C, D]``, ``present [L, 2, B, Hkv, N, D]`` (the step's new
    tokens), ``rows [B, A]`` int64 (row b's accepted node indices in order, padded with -1:
    the path `verify_greedy` returns), ``start [B]`` int64 (row b's first free slot, its
    past length). For every ``rows[b, j] >= 0``::

        cache[:, :, b, :, start[b] + j] = present[:, :, b, :, rows[b, j]]

    which is `leapc.runtime.kv_cache.KVCache.commit` with a length per row. ``present``
    must not overlap ``cache``: a parallel kernel could read a row after overwriting it.
    """
    check_commit(cache, present, rows, start)
    batch_index, offset = (rows >= 0).nonzero(as_tuple=True)
    nodes, slots = rows[batch_index, offset], start[batch_index] + offset
    cache[:, :, batch_index, :, slots] = present[:, :, batch_index, :, nodes]


def verify_greedy(target: torch.Tensor, tokens: torch.Tensor,
                  parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest accepted root-to-node path of each row's token tree (DESIGN §7, rule 1).

    Shapes: ``target [B, N]`` int64 (the target's argmax at each node), ``tokens [B, N]``
    int64 (the drafted tokens, node 0 the root), ``parents [B, N]`` int64 (-1 for the root;
    a parent precedes its child). Starting at the root, descend to the first child, in
    index order, whose token equals the target's argmax at the current node; stop when none
    does. This is `leapc.runtime.acceptance.accept_deterministic` under greedy sampling.
    A row with a smaller tree pads with parent -1: such nodes are nobody's child.

    Returns ``path [B, N]`` int64 (node indices, root first, padded with -1) and
    ``length [B]`` int64 (nodes on the path: accepted drafts + 1). The step emits
    ``target[b, path[b, :length[b]]]``: each accepted token (it equals the argmax at its
    parent) and then the bonus token, the argmax at the last node.
    """
    batch, new = tokens.shape
    path = torch.full((batch, new), -1, dtype=torch.int64, device=tokens.device)
    length = torch.empty(batch, dtype=torch.int64, device=tokens.device)
    for b in range(batch):
        walk = [0]
        while True:
            match = (parents[b] == walk[-1]) & (tokens[b] == target[b, walk[-1]])
            if not bool(match.any()):
                break
            walk.append(int(match.nonzero()[0]))  # the first matching child, as acceptance.py
        path[b, : len(walk)] = torch.tensor(walk)
        length[b] = len(walk)
    return path, length
