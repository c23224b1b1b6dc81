"""The radix prefix cache: KV pages of finished (and running) requests, keyed by their tokens,
so a request that shares a prefix reuses its KV instead of recomputing it.

Keys are cut at page boundaries, so every node holds whole pages. Nodes that running requests
use are locked by reference counts; unlocked leaves are evicted least-recently-used under
memory pressure. No torch.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

_clock = itertools.count()


@dataclass(eq=False)
class TreeNode:
    key: list[int] = field(default_factory=list)  # tokens, a multiple of page_size
    pages: list[int] = field(default_factory=list)  # len(key) // page_size page ids
    parent: "TreeNode | None" = None
    children: dict[tuple[int, ...], "TreeNode"] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass
class MatchResult:
    pages: list[int]  # pages of the matched prefix, in order
    node: TreeNode  # the deepest matched node (lock it while the pages are in use)

    @property
    def num_pages(self) -> int:
        return len(self.pages)


class RadixCache:
    """Prefix tree over token ids whose nodes own KV pages.

    Accounting: every page is either free in the allocator, owned by exactly one tree node, or
    owned by exactly one request (its pages past the cached prefix).
    """

    def __init__(self, page_size: int, free_pages: Callable[[list[int]], None]) -> None:
        self.page_size = page_size
        self._free_pages = free_pages
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self.total_pages = 0
        self.protected_pages = 0  # pages in nodes with lock_ref > 0

    @property
    def evictable_pages(self) -> int:
        return self.total_pages - self.protected_pages

    def _child_key(self, tokens: list[int], start: int) -> tuple[int, ...]:
        return tuple(tokens[start : start + self.page_size])

    def _aligned(self, n: int) -> int:
        return n - n % self.page_size

    # ------------------------------------------------------------------ lookup
    def match_prefix(self, tokens: list[int], touch: bool = True) -> MatchResult:
        """The longest cached, page-aligned prefix of ``tokens``.

        Splits a node when the match ends inside it, so the result ends on a node boundary.
        With ``touch=False`` nothing is split or marked used (for policies that only peek).
        """
        n = self._aligned(len(tokens))
        node = self.root
        pages: list[int] = []
        pos = 0
        now = next(_clock)
        while pos < n:
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            common = self._common_len(child.key, tokens, pos, n)
            if common < len(child.key):
                if not touch:
                    pages.extend(child.pages[: common // self.page_size])
                    pos += common
                    break
                child = self._split(child, common)
            if touch:
                child.last_access = now
            pages.extend(child.pages)
            pos += len(child.key)
            node = child
        return MatchResult(pages, node)

    def match_len(self, tokens: list[int]) -> int:
        """Number of leading tokens cached (no side effects)."""
        return self.match_prefix(tokens, touch=False).num_pages * self.page_size

    def _common_len(self, key: list[int], tokens: list[int], start: int, end: int) -> int:
        """Length of the common page-aligned prefix of ``key`` and ``tokens[start:end]``."""
        i = 0
        limit = min(len(key), end - start)
        while i < limit and key[i] == tokens[start + i]:
            i += 1
        return self._aligned(i)

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Cut ``node`` after ``at`` tokens; return the new upper part."""
        assert 0 < at < len(node.key) and at % self.page_size == 0
        parent = node.parent
        assert parent is not None
        upper = TreeNode(key=node.key[:at], pages=node.pages[: at // self.page_size], parent=parent,
                         lock_ref=node.lock_ref, last_access=node.last_access)
        parent.children[self._child_key(upper.key, 0)] = upper
        node.key = node.key[at:]
        node.pages = node.pages[at // self.page_size :]
        node.parent = upper
        upper.children[self._child_key(node.key, 0)] = node
        return upper

    # ------------------------------------------------------------------ insert
    def insert(self, tokens: list[int], pages: list[int]) -> tuple[int, TreeNode]:
        """Insert ``tokens`` (page-aligned) whose KV lives in ``pages``.

        Returns ``(num_dup_pages, last_node)``: the first ``num_dup_pages`` pages were already
        cached under other page ids — the caller still owns those duplicates and must free
        them (or keep using the tree's). The remaining pages now belong to the tree.
        """
        n = self._aligned(len(tokens))
        assert len(pages) >= n // self.page_size
        node = self.root
        pos = 0
        now = next(_clock)
        while pos < n:
            key = self._child_key(tokens, pos)
            child = node.children.get(key)
            if child is None:
                new = TreeNode(key=tokens[pos:n], pages=list(pages[pos // self.page_size : n // self.page_size]),
                               parent=node, last_access=now)
                node.children[key] = new
                self.total_pages += len(new.pages)
                return pos // self.page_size, new
            common = self._common_len(child.key, tokens, pos, n)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            pos += len(child.key)
            node = child
        return n // self.page_size, node

    # ------------------------------------------------------------------ locking
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root and node is not None:
            if node.lock_ref == 0:
                self.protected_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root and node is not None:
            assert node.lock_ref > 0, "radix node unlocked more often than locked"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.protected_pages -= len(node.pages)
            node = node.parent  # type: ignore[assignment]

    # ------------------------------------------------------------------ eviction
    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages from unlocked leaves, least recently used first;
        returns how many were freed (less if not enough are evictable)."""
        if num_pages <= 0:
            return 0
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves() if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._child_key(leaf.key, 0)]
            self._free_pages(leaf.pages)
            freed += len(leaf.pages)
            self.total_pages -= len(leaf.pages)
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _leaves(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.is_leaf and node is not self.root:
                out.append(node)
            stack.extend(node.children.values())
        return out

    def all_pages(self) -> list[int]:
        """Every page the tree owns (for invariant checks)."""
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.extend(node.pages)
            stack.extend(node.children.values())
        return out

    def reset(self) -> None:
        """Drop everything (all nodes must be unlocked)."""
        self.evict(self.total_pages)
