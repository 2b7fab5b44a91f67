"""Async scheduling changes no output, the KV cache is sized from memory, and the engine
times its phases."""

import math

import jax
import pytest
from serve_helpers import ENGINE_OPTIONS

from jaxstack.cli import use_compilation_cache
from jaxstack.data import ByteTokenizer
from jaxstack.serve import LLM, EngineConfig, SamplingParams
from jaxstack.serve.engine import Engine
from jaxstack.serve.metrics import PHASES


@pytest.fixture(scope="module")
def sync_llm(tiny):
    """The shared engine's shapes, without async scheduling and with the cache sized from
    memory (no ``num_pages``)."""
    model, params = tiny
    options = {k: v for k, v in ENGINE_OPTIONS.items() if k != "num_pages"}
    llm = LLM(model, params, tokenizer=ByteTokenizer(), progress=False,
              async_scheduling=False, **options)  # fmt: skip
    yield llm
    llm.close()


def test_outputs_are_the_same_with_and_without_async_scheduling(llm, sync_llm, workload):
    prompts, max_tokens, expected = workload
    assert llm.engine.config.async_scheduling and not sync_llm.engine.config.async_scheduling
    greedy = [SamplingParams(max_tokens=m) for m in max_tokens]
    assert [o.token_ids for o in sync_llm.generate(prompts, greedy)] == expected
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == expected
    seeded = [SamplingParams(max_tokens=m, temperature=1.0, top_k=50, seed=i)
              for i, m in enumerate(max_tokens)]  # fmt: skip
    outputs = [o.token_ids for o in llm.generate(prompts, seeded)]
    assert outputs == [o.token_ids for o in sync_llm.generate(prompts, seeded)]
    assert outputs != expected  # it did sample
    assert llm.engine.cache.num_used == 0 and sync_llm.engine.cache.num_used == 0


def test_cache_sized_from_memory_up_to_every_sequence_at_full_length(sync_llm):
    engine = sync_llm.engine
    per_seq = math.ceil(engine.max_model_len / engine.config.page_size)
    assert engine.config.num_pages is None
    assert engine.num_pages == engine.cache.num_pages == per_seq * engine.config.seq_buckets[-1]
    assert f"{engine.num_pages * engine.config.page_size} tokens" in engine.plan


def test_memory_fraction_that_fits_nothing_says_what_to_change(tiny):
    model, params = tiny
    config = EngineConfig(memory_fraction=1e-12, max_model_len=128)
    with pytest.raises(ValueError, match="memory_fraction=1e-12 leaves 0.0 MiB.*set num_pages"):
        Engine(model, params, config, progress=False)
    with pytest.raises(ValueError, match=r"memory_fraction=1.5 must be in \(0, 1\]"):
        EngineConfig(memory_fraction=1.5)


def test_phase_seconds_in_the_engine_and_in_prometheus(llm):
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    phases = llm.engine.phase_seconds
    assert set(phases) == set(PHASES) and all(phases[p] > 0 for p in PHASES)
    registry = llm.engine.metrics.registry
    for phase in PHASES:
        value = registry.get_sample_value("jaxstack_engine_phase_seconds_total", {"phase": phase})
        assert value == pytest.approx(llm.engine.phase_seconds[phase], rel=0.5)


def test_compilation_cache_setting(tmp_path, monkeypatch):
    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
    saved = {key: getattr(jax.config, key) for key in keys}
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "suite"))
        assert use_compilation_cache(None) == str(tmp_path / "suite")  # respected
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
        assert use_compilation_cache(None) == str(tmp_path / "home" / "jaxstack" / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "home/jaxstack/xla")
        assert use_compilation_cache(str(tmp_path / "mine")) == str(tmp_path / "mine")
        assert (tmp_path / "mine").is_dir() and jax.config.jax_enable_compilation_cache
        assert use_compilation_cache("off") is None and not jax.config.jax_enable_compilation_cache
    finally:
        for key, value in saved.items():
            jax.config.update(key, value)
