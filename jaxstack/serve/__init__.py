"""Serving: continuous batching over a paged KV cache, offline (``LLM``) and over HTTP.

* :class:`LLM`: ``LLM(hf=DIR).generate(prompts, SamplingParams(...))`` for offline batches.
* :class:`Engine`: the request queue and engine thread (``engine.py``), over the
  :class:`~jaxstack.serve.scheduler.Scheduler` (chunked prefill, preemption), the
  :class:`~jaxstack.serve.kv_cache.KVCacheManager` (pages, prefix cache) and the
  :class:`~jaxstack.serve.runner.ModelRunner` (the jitted paged step, shape buckets).
* :mod:`jaxstack.serve.server`: the OpenAI-compatible HTTP server (``jaxstack serve``), its
  request bodies (:mod:`~jaxstack.serve.protocol`) and its API keys and body cap
  (:mod:`~jaxstack.serve.security`; the settings, web-free, in
  :mod:`~jaxstack.serve.server_config`); it needs the ``serve`` extra
  (``pip install "jaxstack[serve]"``), the engine and ``LLM`` do not.
* :mod:`jaxstack.serve.plan`: per-device bytes of a serving configuration before loading
  (``jaxstack serve --dry-run``).
"""

from jaxstack.serve.engine import Engine, EngineConfig, QueueFullError, RequestOutput
from jaxstack.serve.llm import LLM
from jaxstack.serve.sampling import SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "QueueFullError", "RequestOutput", "SamplingParams"]
