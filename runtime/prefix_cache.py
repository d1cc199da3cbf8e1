"""Prompt KV reuse across requests (automatic prefix caching, as vLLM and SGLang do it).

Requests that begin with the same tokens (a system prompt, few-shot examples, the file
being edited, the earlier turns of a chat) compute the same keys and values for them. A
`PrefixCache` keeps the prompt KV of finished prefills in blocks of ``block`` tokens, in
a trie keyed by each block's tokens under the blocks before it, and a new request takes
the longest run of its prompt's whole blocks from it, prefilling only the rest.

Why this is exact: a token's KV row depends only on the tokens up to it and on its
position, and a step's arithmetic for a row does not depend on the step's width or on
which other tokens share the call (DESIGN §7a). That is the property drafting policies
need to verify exactly (`Manifest.inexact_verification`), so the scheduler reuses
prefixes on exactly the engines where it holds: the rows another request's prefill wrote
are the rows this request's own prefill would write, bit for bit.

Memory is bounded by ``budget_bytes``: the least recently used blocks go first. A path
is touched from its last block back to the first, so every block is used at least as
recently as any block under it, and the least recently used block is always a leaf.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from leapc.runtime.kv_cache import KVCache


@dataclass(eq=False)
class _Block:
    """One block of a prompt's KV, ``[L, 2, Hkv, block, Dh]``, under its parent."""

    tokens: tuple[int, ...]
    kv: np.ndarray | None  # None only at the root
    parent: _Block | None
    children: dict[tuple[int, ...], _Block] = field(default_factory=dict)


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up and tokens reused (vLLM's ``prefix_cache_queries`` and
    ``prefix_cache_hits``)."""

    queried: int = 0
    reused: int = 0


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16):
        if budget_bytes <= 0 or block <= 0:
            raise ValueError(f"PrefixCache needs a positive budget and block (got "
                             f"{budget_bytes} bytes, block {block})")
        self.budget, self.block = budget_bytes, block
        self.root = _Block((), None, None)
        self.recent: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.stats = PrefixCacheStats()

    def reuse(self, prompt: list[int], cache: KVCache) -> int:
        """Write the longest cached run of ``prompt``'s whole blocks into the empty
        ``cache`` and return its length in tokens. The prompt's last token is always left
        to prefill: its logits predict the first new token."""
        if cache.length:
            raise ValueError(f"PrefixCache.reuse: the cache already holds {cache.length} slots")
        path = self._walk(prompt[: len(prompt) - 1])
        self.stats.queried += len(prompt)
        if not path:
            return 0
        self._touch(path)
        rows = np.concatenate([b.kv for b in path], axis=3)[:, :, None]  # [L, 2, 1, H, n, D]
        cache.commit(rows, np.arange(rows.shape[4]))
        self.stats.reused += rows.shape[4]
        return rows.shape[4]

    def store(self, prompt: list[int], cache: KVCache) -> None:
        """Keep the KV of ``prompt``'s whole blocks, which ``cache`` (one row) holds in
        its first slots, then drop least recently used blocks beyond the budget."""
        whole = min(len(prompt), cache.length) // self.block * self.block
        node, path = self.root, []
        for start in range(0, whole, self.block):
            key = tuple(prompt[start : start + self.block])
            child = node.children.get(key)
            if child is None:
                kv = cache.buffer[: cache.layers, :, 0, :, start : start + self.block].copy()
                child = node.children[key] = _Block(key, kv, node)
                self.bytes += kv.nbytes
            node = child
            path.append(child)
        self._touch(path)
        self._evict()

    def _walk(self, tokens: list[int]) -> list[_Block]:
        node, path = self.root, []
        for start in range(0, len(tokens) - self.block + 1, self.block):
            node = node.children.get(tuple(tokens[start : start + self.block]))
            if node is None:
                break
            path.append(node)
        return path

    def _touch(self, path: list[_Block]) -> None:
        for node in reversed(path):  # a parent ends up more recent than its children
            self.recent[id(node)] = node
            self.recent.move_to_end(id(node))

    def _evict(self) -> None:
        while self.bytes > self.budget:
            _, node = self.recent.popitem(last=False)
            if node.children:
                raise AssertionError("PrefixCache: the least recently used block has "
                                     "children (paths must be touched leaf first)")
            del node.parent.children[node.tokens]
            self.bytes -= node.kv.nbytes
