"""Prefix caching: the KV state of prompt prefixes, kept for later requests that share them.

A prompt's context is cut into blocks of `block_tokens` tokens. A block is keyed by its own
tokens and the block before it (an integer id that stands for every token before it), so a
block matches only after the same whole prefix, as vLLM's hashed blocks; the key is exact
(the tokens themselves, not a hash of them), so a match can never be a collision. A block
holds the model's cache for its positions (`model.read_prefix`), and a hit writes the chain
back into a batch row (`model.write_prefix`): the row's prefill then runs over the
remaining tokens only.

Eviction is least-recently-used within `capacity_bytes`. Every lookup and insert touches a
chain from its last block to its first, so a block is always at least as recent as any
block after it: the oldest block is a leaf, and evicting it never strands a reachable
block behind a missing one.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_TOKENS = 16
DEFAULT_CAPACITY_MB = 64

State = dict[str, torch.Tensor]


@dataclass
class Block:
    id: int
    key: tuple
    kv: State  # the model's cache for this block's positions
    nbytes: int


class PrefixCache:
    """Blocks of prompt-prefix KV state, keyed by token prefix, LRU within a byte budget.

    `namespace` separates caches that the same tokens must not share (a LoRA adapter
    changes the keys and values of every token)."""

    def __init__(self, capacity_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()
        self.nbytes = 0
        self._ids = itertools.count(1)
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens found cached (vLLM's prefix_cache_hits)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def _chain(self, tokens: list[int], namespace: Hashable) -> list[Block]:
        """The cached blocks that begin `tokens`, in order (nothing counted or touched)."""
        chain: list[Block] = []
        parent: Hashable = ("root", namespace)
        size = self.block_tokens
        for index in range(len(tokens) // size):
            block = self.blocks.get((parent, tuple(tokens[index * size : (index + 1) * size])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def match(self, tokens: list[int], namespace: Hashable = None) -> list[Block]:
        """The longest chain of cached blocks that begins `tokens` (counted as a query of
        len(tokens) tokens and a hit of the chain's)."""
        chain = self._chain(tokens, namespace)
        self._touch(chain)
        self.queries += len(tokens)
        self.hits += len(chain) * self.block_tokens
        return chain

    def peek(self, tokens: list[int], namespace: Hashable = None) -> int:
        """How many leading tokens of `tokens` are cached (no query counted, nothing touched)."""
        return len(self._chain(tokens, namespace)) * self.block_tokens

    def insert(
        self,
        tokens: list[int],
        read: Callable[[int, int], list[State]],
        namespace: Hashable = None,
    ) -> None:
        """Cache every whole block of `tokens` not cached yet; `read(start, end)` gives the
        model's cache for positions [start, end) as one piece per block (copied: the row
        will be overwritten). Blocks read together share one copy, freed with the last."""
        if self.capacity_bytes <= 0:
            return
        size = self.block_tokens
        chain = self._chain(tokens, namespace)
        first, total = len(chain), len(tokens) // size
        if first < total:  # every block after the first missing one is new too
            parent: Hashable = chain[-1].id if chain else ("root", namespace)
            for index, kv in enumerate(read(first * size, total * size), first):
                key = (parent, tuple(tokens[index * size : (index + 1) * size]))
                nbytes = sum(t.numel() * t.element_size() for t in kv.values())
                block = Block(next(self._ids), key, kv, nbytes)
                self.blocks[key] = block
                self.nbytes += nbytes
                chain.append(block)
                parent = block.id
        self._touch(chain)
        self._evict()

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # the first block ends up the most recent
            self.blocks.move_to_end(block.key)

    def _evict(self) -> None:
        while self.nbytes > self.capacity_bytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.nbytes -= block.nbytes
            self.evictions += 1
