"""Property-based tests of the paged allocator and the radix prefix cache: random
insert / match / lock / unlock / evict / free sequences keep every invariant."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loopserve.core.mem.kv_pool import PagedAllocator
from loopserve.core.mem.radix_cache import RadixCache


class Model:
    """Requests holding (tokens, pages, locked node) over an allocator and a radix cache."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.alloc = PagedAllocator(num_pages, page_size)
        self.tree = RadixCache(page_size, self.alloc.free)
        self.page_size = page_size
        self.live: list[dict] = []

    def check(self) -> None:
        tree_pages = self.tree.all_pages()
        own = [p for r in self.live for p in r["pages"][r["shared"]:]]
        free = [p for p in range(self.alloc.num_pages) if self.alloc._is_free[p]]
        everything = tree_pages + own + free
        # No page is owned twice; free + cached + in use == total.
        assert len(everything) == len(set(everything)), "a page has two owners"
        assert len(everything) == self.alloc.num_pages
        assert self.tree.total_pages == len(tree_pages)
        assert self.alloc.num_free == len(free)
        locked = sum(len(n.pages) for n in self._nodes() if n.lock_ref > 0)
        assert self.tree.protected_pages == locked
        for r in self.live:
            # A live request's cached prefix is still in the tree under the same pages.
            m = self.tree.match_prefix(r["tokens"], touch=False)
            assert m.pages[: r["shared"]] == r["pages"][: r["shared"]]

    def _nodes(self):
        stack = [self.tree.root]
        while stack:
            n = stack.pop()
            if n is not self.tree.root:
                yield n
            stack.extend(n.children.values())

    def start(self, tokens: list[int]) -> None:
        m = self.tree.match_prefix(tokens)
        shared = m.num_pages
        need = -(-len(tokens) // self.page_size) - shared
        if need > self.alloc.num_free:
            self.tree.evict(need - self.alloc.num_free)
        own = self.alloc.alloc(need)
        if own is None:
            return
        self.tree.inc_lock_ref(m.node)
        self.live.append({"tokens": tokens, "pages": m.pages + own, "shared": shared, "node": m.node})

    def finish(self, i: int) -> None:
        r = self.live.pop(i)
        n_aligned = len(r["tokens"]) - len(r["tokens"]) % self.page_size
        dup, _ = self.tree.insert(r["tokens"][:n_aligned], r["pages"][: n_aligned // self.page_size])
        tree_pages = self.tree.match_prefix(r["tokens"][:n_aligned], touch=False).pages
        for k in range(r["shared"], dup):
            # Pages computed again although the tree already had them: give them back.
            assert r["pages"][k] != tree_pages[k]
            self.alloc.free([r["pages"][k]])
        tail = r["pages"][n_aligned // self.page_size :]
        if tail:
            self.alloc.free(tail)
        self.tree.dec_lock_ref(r["node"])


ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.lists(st.integers(0, 3), min_size=1, max_size=12)),
        st.tuples(st.just("finish"), st.integers(0, 20)),
        st.tuples(st.just("evict"), st.integers(0, 8)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, page_size=st.sampled_from([1, 2, 4]))
def test_random_operations_keep_invariants(ops, page_size):
    m = Model(num_pages=24, page_size=page_size)
    for op, arg in ops:
        if op == "start":
            m.start(arg)
        elif op == "finish" and m.live:
            m.finish(arg % len(m.live))
        elif op == "evict":
            m.tree.evict(arg)
        m.check()
    while m.live:
        m.finish(0)
        m.check()
    assert m.tree.protected_pages == 0
    m.tree.reset()
    assert m.alloc.num_free == m.alloc.num_pages


def test_match_reuses_pages_and_splits():
    alloc = PagedAllocator(16, 1)
    tree = RadixCache(1, alloc.free)
    pages = alloc.alloc(5)
    dup, _ = tree.insert([1, 2, 3, 4, 5], pages)
    assert dup == 0 and tree.total_pages == 5
    m = tree.match_prefix([1, 2, 3, 9])
    assert m.pages == pages[:3]
    assert tree.match_len([1, 2, 3, 4, 5, 6]) == 5
    other = alloc.alloc(4)
    dup, _ = tree.insert([1, 2, 3, 7], other)
    assert dup == 3  # the first three were cached already under other page ids
    alloc.free(other[:3])
    assert tree.total_pages == 6


def test_locked_nodes_are_not_evicted_and_lru_order():
    alloc = PagedAllocator(8, 1)
    tree = RadixCache(1, alloc.free)
    a = alloc.alloc(2)
    tree.insert([1, 1], a)
    b = alloc.alloc(2)
    tree.insert([2, 2], b)
    c = alloc.alloc(2)
    tree.insert([3, 3], c)
    tree.match_prefix([1, 1])  # touch: [1,1] is now the most recent
    locked = tree.match_prefix([2, 2]).node
    tree.inc_lock_ref(locked)
    assert tree.evictable_pages == 4
    assert tree.evict(2) == 2  # [3,3] goes first: oldest unlocked
    assert tree.match_len([3, 3]) == 0 and tree.match_len([1, 1]) == 2
    assert tree.evict(10) == 2  # only [1,1] is left to evict; [2,2] is locked
    assert tree.match_len([2, 2]) == 2
    tree.dec_lock_ref(locked)
    assert tree.evict(10) == 2
    assert alloc.num_free == 8


def test_page_aligned_matching():
    alloc = PagedAllocator(8, 4)
    tree = RadixCache(4, alloc.free)
    pages = alloc.alloc(2)
    tree.insert(list(range(8)), pages)
    assert tree.match_len(list(range(7))) == 4  # only whole pages match
    assert tree.match_len(list(range(3)) + [99] * 5) == 0
    assert tree.match_prefix(list(range(8)) + [5]).pages == pages
