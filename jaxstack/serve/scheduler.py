"""Iteration-level scheduling with chunked prefill (Sarathi-Serve) over the paged KV cache.

Every engine step the scheduler picks, under a token budget, what each sequence computes:

1. running sequences, oldest first, decodes (one pending token) before prefill chunks, so a
   long prompt never stalls running decodes; when the cache has no page for one, the newest
   running sequence is preempted (its pages freed, its tokens recomputed later);
2. then waiting requests in arrival order, each starting with the longest prefix the prefix
   cache already holds, taking a chunk of what is left of the budget and the free pages.

A sequence's pending tokens are its prompt plus outputs minus the tokens whose keys are in
the cache, so a decode, a prefill chunk and the recompute after preemption are one case.
"""

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from jaxstack.serve.kv_cache import KVCacheManager, PageKey, page_keys
from jaxstack.serve.sampling import SamplingParams

UNRESOLVED = -1
"""Stands for an output token sampled by a step still on the device (async scheduling)."""


@dataclass(eq=False)
class RequestState:
    """One request's tokens and its place in the KV cache (owned by the engine thread)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival: int
    """Admission order: lower is older (preemption takes the highest first)."""
    limit: int = 2**62
    """Most tokens (prompt + output) it may reach; the scheduler computes none past it."""
    tokens: list[int] = field(init=False)
    """Prompt then outputs, appended in place; an output still on the device is
    ``UNRESOLVED`` (only ever the last one, see ``num_resolved``)."""
    num_resolved: int = field(init=False)
    """Leading ``tokens`` known on the host."""
    sample_row: int = 0
    """Row of the step that sampled the unresolved last token."""
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens from the start whose keys and values are in the cache."""
    num_registered: int = 0
    """Leading pages offered to the prefix cache."""
    last_key: PageKey = b""
    """Prefix key of page ``num_registered - 1``."""
    matcher: Any = None
    """The ``xgrammar`` matcher of a request with a ``response_format`` (``structured.py``)."""

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.num_resolved = len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output(self) -> int:
        """Output tokens so far (an unresolved one included)."""
        return len(self.tokens) - len(self.prompt)

    @property
    def num_pending(self) -> int:
        """Tokens to compute before the next one can be sampled."""
        return len(self.tokens) - self.num_computed

    def add_unresolved(self, row: int) -> None:
        """A step now on the device samples this sequence's next token in ``row``."""
        self.tokens.append(UNRESOLVED)
        self.sample_row = row

    def resolve(self, index: int, token: int) -> None:
        """The token at ``index`` (unresolved so far) is ``token``."""
        self.tokens[index] = token
        self.num_resolved = max(self.num_resolved, index + 1)

    def drop_unresolved(self) -> None:
        """Forget an output still on the device (its step failed: it is recomputed)."""
        del self.tokens[self.num_resolved :]


@dataclass
class SchedulerStats:
    """Counters since start-up."""

    computed_tokens: int = 0
    """Tokens run through the model."""
    prefill_tokens: int = 0
    """Of those, prompt tokens (a prefix-cache hit lowers this)."""
    prefix_hit_tokens: int = 0
    """Prompt and output tokens taken from the prefix cache instead of computed."""
    preemptions: int = 0


class Scheduler:
    """Decides each step's ``[(sequence, tokens to compute)]`` and keeps page tables.

    ``max_num_tokens`` is the token budget per step, ``max_num_seqs`` the most sequences
    running (and in one step). Not thread-safe: the engine thread owns it.
    """

    def __init__(self, cache: KVCacheManager, *, max_num_tokens: int, max_num_seqs: int):
        self.cache = cache
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        self.waiting: list[RequestState] = []  # sorted by arrival
        self.running: list[RequestState] = []  # sorted by arrival
        self.stats = SchedulerStats()

    def add(self, seq: RequestState) -> None:
        """Queue ``seq`` (a new request, arrival order)."""
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def remove(self, seq: RequestState) -> None:
        """Drop ``seq`` (finished or cancelled) and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def requeue_running(self) -> list[RequestState]:
        """Move every running sequence back to the waiting queue with its pages freed (its
        tokens are recomputed when it is admitted again); returns them."""
        requeued = list(self.running)
        for seq in requeued:
            self.running.remove(seq)
            self._free(seq)
            bisect.insort(self.waiting, seq, key=lambda s: s.arrival)
        return requeued

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[RequestState, int]]:
        """This step's sequences and how many of their pending tokens each computes."""
        chosen: dict[RequestState, int] = {}
        for seq in sorted(self.running, key=lambda s: (s.num_pending > 1, s.arrival)):
            if seq.num_tokens >= seq.limit:  # its last token ends it once resolved
                continue
            budget = self.max_num_tokens - sum(chosen.values())
            if budget == 0:
                break
            if seq in self.running:  # not preempted by an older sequence in this loop
                self._grow_or_preempt(seq, min(seq.num_pending, budget), chosen)
        while self.waiting and len(self.running) < self.max_num_seqs:
            budget = self.max_num_tokens - sum(chosen.values())
            seq = self.waiting[0]
            if seq.num_resolved < seq.num_tokens:  # preempted while its last token was on
                break  # the device: admitted once that token is known (next step)
            if budget == 0 or not self._admit(seq, budget, chosen):
                break
        return list(chosen.items())

    def advance(self, step: list[tuple[RequestState, int]]) -> None:
        """Record that ``step`` ran: its tokens' keys are in the cache; full pages enter the
        prefix cache."""
        for seq, n in step:
            self.stats.computed_tokens += n
            self.stats.prefill_tokens += max(0, min(len(seq.prompt) - seq.num_computed, n))
            seq.num_computed += n
            self.register_pages(seq)

    def register_pages(self, seq: RequestState) -> None:
        """Offer ``seq``'s computed full pages whose tokens are all known to the prefix
        cache (a page ending in a token still on the device waits for it)."""
        ps = self.cache.page_size
        full = min(seq.num_computed, seq.num_resolved) // ps
        if full > seq.num_registered:
            span = seq.tokens[seq.num_registered * ps : full * ps]
            for key in page_keys(span, ps, seq.last_key):
                self.cache.register(seq.pages[seq.num_registered], key)
                seq.num_registered, seq.last_key = seq.num_registered + 1, key

    def _pages_for(self, seq: RequestState, n: int) -> int:
        """New pages ``seq`` needs to compute ``n`` more tokens."""
        return max(0, math.ceil((seq.num_computed + n) / self.cache.page_size) - len(seq.pages))

    def _grow_or_preempt(self, seq: RequestState, n: int, chosen: dict[RequestState, int]) -> None:
        """Schedule ``n`` tokens of running ``seq``, preempting the newest running sequences
        (``seq`` itself last) until its pages fit."""
        while (pages := self.cache.allocate(self._pages_for(seq, n))) is None:
            victim = self.running[-1]
            chosen.pop(victim, None)
            self._preempt(victim)
            if victim is seq:
                return
        seq.pages += pages
        chosen[seq] = n

    def _admit(self, seq: RequestState, budget: int, chosen: dict[RequestState, int]) -> bool:
        """Start waiting ``seq`` with a chunk of at most ``budget`` tokens; False (and nothing
        changed) when no page is free for even one token."""
        ps = self.cache.page_size
        # the last token is always computed: its logits give the next token
        keys = page_keys(seq.tokens[: seq.num_tokens - 1], ps)
        cached = self.cache.acquire_prefix(keys)
        seq.pages, seq.num_computed = cached, len(cached) * ps
        seq.num_registered = len(cached)
        seq.last_key = keys[len(cached) - 1] if cached else b""
        n = min(seq.num_pending, budget, self.cache.num_free * ps)
        pages = self.cache.allocate(self._pages_for(seq, n)) if n > 0 else None
        if pages is None:
            self._free(seq)
            return False
        self.stats.prefix_hit_tokens += seq.num_computed
        seq.pages += pages
        self.waiting.remove(seq)
        bisect.insort(self.running, seq, key=lambda s: s.arrival)
        chosen[seq] = n
        return True

    def _preempt(self, seq: RequestState) -> None:
        self.running.remove(seq)
        self._free(seq)
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)
        self.stats.preemptions += 1

    def _free(self, seq: RequestState) -> None:
        self.cache.release(seq.pages)
        seq.pages, seq.num_computed, seq.num_registered, seq.last_key = [], 0, 0, b""
