"""KV memory bookkeeping: the paged token-to-KV allocator and the request-to-token pool.

The device tensors live in the worker; this module only decides which page and slot each
token uses, and keeps the accounting that ``self_check_during_idle`` verifies. No torch.
"""

from __future__ import annotations


class PagedAllocator:
    """Hands out fixed-size pages of the token-to-KV pool.

    Page ``p`` holds token slots ``p * page_size .. p * page_size + page_size - 1``.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def alloc(self, n: int) -> list[int] | None:
        """``n`` pages, or None (and nothing allocated) if fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        for p in pages:
            self._is_free[p] = False
        return pages[::-1]

    def free(self, pages: list[int]) -> None:
        for p in pages:
            # NOTE: a double free would make one page serve two owners later; fail loudly.
            assert not self._is_free[p], f"KV page {p} freed twice"
            self._is_free[p] = True
        self._free.extend(pages)

    def pages_needed(self, have_pages: int, new_len: int) -> int:
        """Extra pages a sequence holding ``have_pages`` pages needs to reach ``new_len`` tokens."""
        need = -(-new_len // self.page_size)
        return max(0, need - have_pages)


class ReqToTokenPool:
    """Rows of the request-to-token table: one per running request, at most ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = list(range(size - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, idx: int) -> None:
        assert idx not in self._free, f"request row {idx} freed twice"
        self._free.append(idx)


def slots_for(pages: list[int], page_size: int, start: int, end: int) -> list[int]:
    """KV slots of token positions ``start .. end - 1`` of a sequence that owns ``pages``."""
    if page_size == 1:
        return pages[start:end]
    return [pages[i // page_size] * page_size + i % page_size for i in range(start, end)]
