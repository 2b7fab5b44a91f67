"""Page allocator and prefix cache bookkeeping (host only), and the per-row sampler."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.serve.kv_cache import KVCacheManager, page_keys
from jaxstack.serve.sampling import sample_rows


def test_page_keys_name_whole_prefixes():
    a, b = page_keys([1, 2, 3, 4, 5, 6, 7], 3), page_keys([9, 2, 3, 4, 5, 6], 3)
    assert len(a) == 2 and len(b) == 2  # only full pages
    assert a[1] != b[1]  # same second page, different first page: different prefix
    assert page_keys([4, 5, 6], 3, parent=a[0]) == [a[1]]  # continuing a chain


def test_allocate_release_and_refcounts():
    cache = KVCacheManager(num_pages=4, page_size=2)
    first = cache.allocate(3)
    assert cache.allocate(2) is None and cache.num_free == 1  # nothing taken on failure
    keys = page_keys([1, 2, 3, 4], 2)
    cache.register(first[0], keys[0])
    cache.register(first[1], keys[1])
    shared = cache.acquire_prefix(keys + page_keys([1, 2, 3, 4, 5, 6], 2)[2:])
    assert shared == first[:2]  # the third page was never registered
    cache.release(first)
    assert cache.num_used == 2  # the shared prefix is still referenced
    cache.release(shared)
    assert cache.num_used == 0 and cache.num_free == 4 and cache.num_cached == 2
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release([first[2]])


def test_cached_pages_are_evicted_least_recently_released_first():
    cache = KVCacheManager(num_pages=3, page_size=1)
    keys = page_keys([7, 8, 9], 1)
    pages = [cache.allocate(1)[0] for _ in range(3)]
    for page, key in zip(pages, keys, strict=True):
        cache.register(page, key)
    for page in pages:  # released in order: pages[0] is the least recent
        cache.release([page])
    assert cache.allocate(1) == [pages[0]]  # evicted, so its prefix is gone
    assert cache.acquire_prefix(keys) == []  # the chain breaks at the first key
    assert cache.acquire_prefix(keys[1:2]) == [pages[1]]


def test_prefix_caching_off_shares_nothing():
    cache = KVCacheManager(num_pages=2, page_size=1, prefix_caching=False)
    page = cache.allocate(1)[0]
    cache.register(page, page_keys([5], 1)[0])
    assert cache.acquire_prefix(page_keys([5], 1)) == []


def test_sample_rows_applies_each_rows_settings():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    rows = 4000
    logits = jnp.log(jnp.asarray(np.tile(probs, (rows, 1))))
    group = np.arange(rows) % 4  # greedy, top-k 1, top-k 2, top-p 0.7
    temperature = np.where(group == 0, 0.0, 1.0).astype(np.float32)
    top_k = np.select([group == 1, group == 2], [1, 2], 0).astype(np.int32)
    top_p = np.where(group == 3, 0.7, 1.0).astype(np.float32)
    seeds, counters = np.arange(rows, dtype=np.uint32), np.zeros(rows, np.int32)
    out = np.asarray(sample_rows(logits, temperature, top_k, top_p, seeds, counters))
    assert np.all(out[group == 0] == 0) and np.all(out[group == 1] == 0)
    top2 = out[group == 2]
    assert set(top2) == {0, 1} and abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.05
    nucleus = out[group == 3]  # 0.5 + 0.3 reaches 0.7: tokens 0 and 1 only
    assert set(nucleus) == {0, 1} and abs(np.mean(nucleus == 0) - 0.5 / 0.8) < 0.05
    again = sample_rows(logits, temperature, top_k, top_p, seeds, counters)
    assert np.array_equal(out, np.asarray(again))  # the seeds decide
    ones, no_k, no_p = (
        np.ones(rows, np.float32),
        np.zeros(rows, np.int32),
        np.ones(rows, np.float32),
    )
    plain = np.asarray(sample_rows(logits, ones, no_k, no_p, seeds, counters))  # no filtering
    assert np.abs(np.bincount(plain, minlength=4) / rows - probs).max() < 0.03
