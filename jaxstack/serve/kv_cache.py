"""Host-side bookkeeping of the paged KV cache: page allocation, reference counts and the
prefix cache.

The device holds ``num_pages`` pages of ``page_size`` token slots per layer; a sequence owns
a list of pages (its page table) that it fills in order. A page whose ``page_size`` tokens
are all computed gets a key, the hash of the sequence's whole token prefix up to the page's
end, and enters the prefix cache: a later request whose prompt starts with the same tokens
reuses the page (reference counted) instead of recomputing it. A page nobody references is
free; if it holds a cached prefix it stays findable until the allocator needs it, and the
least recently released such page is reused first (LRU).
"""

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np

PageKey = bytes
"""Prefix-cache key of a full page: a digest of every token from the sequence start."""


def page_keys(tokens: Sequence[int], page_size: int, parent: PageKey = b"") -> list[PageKey]:
    """Keys of the full pages of ``tokens`` (continuing after a page with key ``parent``).

    Each key chains the previous page's key with this page's tokens, so a key names the whole
    prefix and two sequences share a key only when they agree on every token before it.
    """
    keys = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        page = np.asarray(tokens[start : start + page_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + page, digest_size=16).digest()
        keys.append(parent)
    return keys


class KVCacheManager:
    """Allocator of ``num_pages`` pages with reference counts and an LRU prefix cache.

    A page is *in use* while a sequence references it, otherwise *free*: either empty, or
    holding a cached prefix that ``acquire_prefix`` can still hand out until ``allocate``
    reclaims it (least recently released first).
    """

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be >= 1")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self._refs = np.zeros(num_pages, np.int32)
        self._empty: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free pages holding a prefix
        self._page_of: dict[PageKey, int] = {}
        self._key_of: dict[int, PageKey] = {}

    @property
    def num_free(self) -> int:
        """Pages no sequence references (empty or holding an evictable cached prefix)."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages that hold a cached prefix (in use or not)."""
        return len(self._key_of)

    def clear(self) -> None:
        """Forget every page's contents (after the device pages were rebuilt empty): the prefix
        cache is emptied and every page is free.

        Raises:
            RuntimeError: a sequence still references pages (release them first).
        """
        if self.num_used:
            raise RuntimeError(f"{self.num_used} pages are still in use; release them first")
        self._empty = deque(range(self.num_pages))
        self._evictable.clear()
        self._page_of.clear()
        self._key_of.clear()

    def allocate(self, n: int) -> list[int] | None:
        """``n`` pages for one sequence's exclusive use, or None (nothing taken) if fewer are
        free. Empty pages go first, then cached prefixes, least recently used first."""
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._empty:
                page = self._empty.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def acquire_prefix(self, keys: Sequence[PageKey]) -> list[int]:
        """The cached pages of the longest run of ``keys`` from the start, each now referenced
        once more (empty when prefix caching is off)."""
        pages = []
        for key in keys if self.prefix_caching else ():
            page = self._page_of.get(key)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, key: PageKey) -> None:
        """Offer a full, in-use ``page`` holding the prefix ``key`` to later requests (a no-op
        when another page already holds that prefix, or prefix caching is off)."""
        if not self.prefix_caching or key in self._page_of or page in self._key_of:
            return
        self._page_of[key] = page
        self._key_of[page] = key

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each of ``pages`` (a sequence's whole table, in order).

        Freed pages holding a prefix become evictable, the table's last page first in line,
        so a shared prefix outlives the pages that continued it.
        """
        for page in reversed(pages):
            if self._refs[page] <= 0:
                raise RuntimeError(f"page {page} released more often than it was taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._empty.append(page)
