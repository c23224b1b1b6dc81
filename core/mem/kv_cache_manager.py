"""Who owns which KV page: the allocator, the radix prefix cache, or a request.

Every page is in exactly one place: free in the allocator, owned by a radix-tree node, or
owned by one request (its pages after the cached prefix). This module moves pages between
those owners — matching a prefix on admission, caching a request's pages when it finishes,
is retracted or completes a prefill — and checks the books while idle. No torch.
"""

from __future__ import annotations

from loopserve.core.mem.kv_pool import PagedAllocator, ReqToTokenPool
from loopserve.core.mem.radix_cache import RadixCache
from loopserve.core.sched.req import Req


class KVLeakError(RuntimeError):
    """KV pages or request rows are unaccounted for while the scheduler is idle."""


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, max_running: int, radix_cache: bool) -> None:
        self.page_size = page_size
        self.allocator = PagedAllocator(num_pages, page_size)
        self.req_pool = ReqToTokenPool(max_running)
        self.tree: RadixCache | None = RadixCache(page_size, self.allocator.free) if radix_cache else None

    # ------------------------------------------------------------------ capacity
    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def cached_pages(self) -> int:
        return self.tree.total_pages if self.tree is not None else 0

    def available_pages(self) -> int:
        """Pages that can be handed out now: free ones plus evictable cached ones."""
        evictable = self.tree.evictable_pages if self.tree is not None else 0
        return self.allocator.num_free + evictable

    def alloc_pages(self, n: int) -> list[int] | None:
        """``n`` pages, evicting least-recently-used cached prefixes if needed; None (and
        nothing taken) when even eviction cannot make room."""
        short = n - self.allocator.num_free
        if short > 0 and self.tree is not None:
            self.tree.evict(short)
        return self.allocator.alloc(n)

    # ------------------------------------------------------------------ admission
    def match_prefix(self, req: Req) -> int:
        """Give a request without KV the longest cached prefix of its sequence (locked);
        returns the number of tokens reused. At least one token is left to compute, since
        the last token's logits are needed."""
        assert not req.kv_pages and req.num_computed == 0
        if self.tree is None:
            return 0
        if req.sampling_params.prompt_logprobs is not None and not req.output_ids:
            return 0  # its whole prompt is scored: every position's logits are computed
        match = self.tree.match_prefix(req.all_ids[: req.seq_len - 1])
        if not match.pages:
            return 0
        self.tree.inc_lock_ref(match.node)
        req.kv_pages = list(match.pages)
        req.num_tree_pages = len(match.pages)
        req.cache_node = match.node
        req.num_computed = len(match.pages) * self.page_size
        req.prefix_dirty = True
        return req.num_computed

    def undo_match(self, req: Req) -> None:
        """Hand a matched-but-not-admitted request's prefix back (it stays cached)."""
        if req.cache_node is not None and self.tree is not None:
            self.tree.dec_lock_ref(req.cache_node)
        req.kv_pages = []
        req.num_tree_pages = 0
        req.cache_node = None
        req.num_computed = 0
        req.prefix_dirty = False

    # ------------------------------------------------------------------ caching
    def cache_unfinished(self, req: Req) -> None:
        """After a prefill (chunk): put the computed, page-aligned prefix into the cache so
        later requests can share it while this one keeps running."""
        if self.tree is not None:
            self._insert(req, keep_lock=True)

    def release(self, req: Req, cache: bool = True) -> None:
        """Give back everything a request holds: computed KV goes into the cache (if on and
        ``cache``), the rest to the allocator; its table row is freed."""
        if self.tree is not None and req.kv_pages:
            if cache and req.num_computed >= self.page_size:
                self._insert(req, keep_lock=False)
            elif req.cache_node is not None:
                self.tree.dec_lock_ref(req.cache_node)
                req.cache_node = None
            own = req.kv_pages[req.num_tree_pages :]
        else:
            own = req.kv_pages
        if own:
            self.allocator.free(own)
        req.kv_pages = []
        req.num_tree_pages = 0
        req.cache_node = None
        req.num_computed = 0
        req.prefix_dirty = False
        if req.req_pool_idx is not None:
            self.req_pool.free(req.req_pool_idx)
            req.req_pool_idx = None

    def _insert(self, req: Req, keep_lock: bool) -> None:
        assert self.tree is not None
        p = self.page_size
        aligned = req.num_computed - req.num_computed % p
        n_pages = aligned // p
        if n_pages <= req.num_tree_pages and keep_lock:
            return  # nothing new to share
        tokens = req.all_ids[:aligned]
        num_dup, node = self.tree.insert(tokens, req.kv_pages[:n_pages])
        if num_dup > req.num_tree_pages:
            # Another request cached the same tokens first: use its pages, free our copies.
            tree_pages = self.tree.match_prefix(tokens, touch=False).pages
            dups = req.kv_pages[req.num_tree_pages : num_dup]
            self.allocator.free(dups)
            req.kv_pages[req.num_tree_pages : num_dup] = tree_pages[req.num_tree_pages : num_dup]
            req.prefix_dirty = True
        old = req.cache_node
        if keep_lock:
            self.tree.inc_lock_ref(node)
            req.cache_node = node
        else:
            req.cache_node = None
        if old is not None:
            self.tree.dec_lock_ref(old)
        # Pages past the aligned prefix stay the request's own.
        req.num_tree_pages = max(req.num_tree_pages, n_pages)

    # ------------------------------------------------------------------ checks
    def check(self, live: list[Req], idle: bool) -> None:
        """free + cached + owned by live requests == total, else ``KVLeakError``."""
        in_use = sum(len(r.kv_pages) - r.num_tree_pages for r in live)
        free = self.allocator.num_free
        cached = self.cached_pages
        total = self.allocator.num_pages
        if free + cached + in_use != total:
            raise KVLeakError(f"KV leak: free {free} + cached {cached} + in use {in_use} != total {total} pages")
        if idle:
            held = self.req_pool.size - self.req_pool.num_free
            if held:
                raise KVLeakError(f"request-row leak: {held} rows held while idle")
            if self.tree is not None and self.tree.protected_pages:
                raise KVLeakError(f"radix-cache lock leak: {self.tree.protected_pages} pages locked while idle")
