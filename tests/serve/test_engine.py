"""The serving engine against ``js.generate``: continuous batching, chunked prefill,
preemption, prefix caching, sharding, sampling, cancellation and faults change nothing they
should not, and nothing recompiles under traffic."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import ENGINE_OPTIONS, EOS

from jaxstack.data import ByteTokenizer
from jaxstack.generate import generate
from jaxstack.mesh import make_mesh
from jaxstack.models import model_for, preset
from jaxstack.serve import LLM, SamplingParams
from jaxstack.serve import engine as engine_module
from jaxstack.serve.engine import Engine, QueueFullError, RequestOutput
from jaxstack.serve.server import create_app

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def run_staggered(engine: Engine, prompts, max_tokens, first: int = 3) -> list[RequestOutput]:
    """Submit ``first`` requests, then the next one whenever a running request has produced
    its second token (or finished): arrivals while others prefill and decode."""
    results: dict[int, RequestOutput] = {}
    all_done, lock, upcoming = threading.Event(), threading.Lock(), iter(range(first, len(prompts)))

    def submit(i: int) -> None:
        triggered = False

        def on_output(out: RequestOutput) -> None:
            nonlocal triggered
            if not triggered and (len(out.token_ids) >= 2 or out.finished):
                triggered = True
                with lock:
                    j = next(upcoming, None)
                if j is not None:
                    submit(j)
            if out.finished:
                results[i] = out
                if len(results) == len(prompts):
                    all_done.set()

        engine.submit(prompts[i], SamplingParams(max_tokens=max_tokens[i]), on_output)

    for i in range(first):
        submit(i)
    assert all_done.wait(timeout=300), f"only {len(results)} of {len(prompts)} finished"
    return [results[i] for i in range(len(prompts))]


def test_staggered_greedy_equals_generate_without_recompiling(llm, workload):
    prompts, max_tokens, expected = workload
    engine = llm.engine
    before = engine.scheduler.stats.preemptions
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outputs = run_staggered(engine, prompts, max_tokens)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    for out, tokens in zip(outputs, expected, strict=True):
        assert out.token_ids == tokens, out.request_id
        assert out.finish_reason == ("stop" if tokens[-1] == EOS else "length")
    assert engine.scheduler.stats.preemptions > before  # the small cache forced preemption
    assert max(len(p) for p in prompts) > ENGINE_OPTIONS["token_buckets"][-1]  # chunked
    assert engine.runner.buckets == [(8, 8), (32, 8)]
    assert engine.num_compilations == 2  # once per bucket, at start-up
    assert COMPILE_EVENT not in compiles


def test_tensor_parallel_serving_equals_generate(tiny, workload):
    model, params = tiny
    prompts, max_tokens, expected = workload
    mesh = make_mesh(data=1, tensor=2, devices=jax.devices()[:2])
    options = dict(ENGINE_OPTIONS, token_buckets=(32,))
    with LLM(model, params, tokenizer=ByteTokenizer(), mesh=mesh, progress=False, **options) as tp:
        runner = tp.engine.runner
        assert all(p.sharding.spec[2] == "tensor" for p in runner.pages)  # KV heads split
        assert runner.params["layers_0"]["attn"]["k"]["kernel"].sharding.spec[1] == "tensor"
        outputs = run_staggered(tp.engine, prompts, max_tokens)
        assert [out.token_ids for out in outputs] == expected
        assert tp.engine.cache.num_used == 0


def test_moe_model_with_scanned_layers_equals_generate(workload):
    model = model_for(preset("tiny-moe", num_layers=2, initializer_range=0.1, max_seq_len=128,
                             scan_layers=True))  # fmt: skip
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    prompts = workload[0][:4]
    expected = generate(model, params, prompts, max_new_tokens=8)
    options = dict(ENGINE_OPTIONS, token_buckets=(32,), seq_buckets=(4,))
    with LLM(model, params, progress=False, **options) as moe:
        outputs = moe.generate(prompts, SamplingParams(max_tokens=8))
    assert [out.token_ids for out in outputs] == expected


def test_prefix_cache_hit_gives_same_tokens_with_less_prefill(llm):
    prompt = np.random.default_rng(1).integers(0, 256, 30).tolist()
    stats = llm.engine.scheduler.stats
    computed = []
    outputs = []
    for _ in range(2):
        before = stats.prefill_tokens
        outputs.append(llm.generate([prompt], SamplingParams(max_tokens=6))[0].token_ids)
        computed.append(stats.prefill_tokens - before)
    assert outputs[0] == outputs[1]
    assert computed[0] == len(prompt)
    page = ENGINE_OPTIONS["page_size"]
    assert computed[1] == len(prompt) - (len(prompt) - 1) // page * page  # 28 tokens reused


def test_pages_all_free_after_200_requests_with_cancellations(llm):
    engine, rng = llm.engine, np.random.default_rng(2)
    finished: list[RequestOutput] = []
    all_done = threading.Event()
    n = 200

    def callback(cancel_after: int | None):
        def on_output(out: RequestOutput) -> None:
            if cancel_after is not None and len(out.token_ids) == cancel_after:
                engine.cancel(out.request_id)
            if out.finished:
                finished.append(out)
                if len(finished) == n:
                    all_done.set()

        return on_output

    for i in range(n):
        prompt = rng.integers(0, 256, int(rng.integers(1, 40))).tolist()
        mode = i % 3  # 0: runs to the end, 1: cancelled mid-stream, 2: cancelled at once
        params = SamplingParams(max_tokens=int(rng.integers(2, 20)), temperature=0.8, seed=i)
        while True:
            try:
                request_id = engine.submit(prompt, params, callback(2 if mode == 1 else None))
                break
            except QueueFullError:  # back-pressure: wait for the queue to drain
                time.sleep(0.01)
        if mode == 2:
            engine.cancel(request_id)
    assert all_done.wait(timeout=300), f"{len(finished)} of {n} finished"
    reasons = {out.finish_reason for out in finished}
    assert "cancelled" in reasons and reasons <= {"cancelled", "stop", "length"}
    assert engine.cache.num_used == 0 and engine.cache.num_free == engine.cache.num_pages
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_seeded_sampling_is_the_same_alone_and_batched(llm, workload):
    prompts = workload[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    alone = llm.generate([prompts[0]], params)[0].token_ids
    others = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in range(5)]
    batched = llm.generate(prompts[:6], [params, *others])
    assert batched[0].token_ids == alone
    greedy = llm.generate([prompts[0]], SamplingParams(max_tokens=12))[0].token_ids
    assert alone != greedy  # it did sample


def test_stop_strings_and_stop_tokens(llm, workload):
    prompts, max_tokens, expected = workload
    tokens = expected[7]
    params = SamplingParams(max_tokens=max_tokens[7], stop_token_ids=(tokens[4],))
    out = llm.generate([prompts[7]], params)[0]
    assert out.token_ids == tokens[: tokens.index(tokens[4]) + 1]
    assert out.finish_reason == "stop"
    # a printable two-character stop string that first occurs a few characters in
    text = ByteTokenizer().decode(tokens)
    windows = [text[j : j + 2] for j in range(len(text) - 1)]
    stop = next(w for w in windows if w.isprintable() and w.isascii() and text.index(w) >= 3)
    out = llm.generate([prompts[7]], SamplingParams(max_tokens=max_tokens[7], stop=stop))[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop"
    # the tokens end where the text does (ASCII characters are single byte tokens)
    cut = next(j for j in range(len(tokens)) if tokens[j : j + 2] == [ord(c) for c in stop])
    assert out.token_ids == tokens[:cut]


def test_a_request_without_a_seed_gets_a_random_one(llm, workload):
    prompt, params = workload[0][0], SamplingParams(max_tokens=16, temperature=100.0)
    outputs = []
    request_id = llm.engine.submit(prompt, params, lambda out: outputs.append(out))
    number = int(request_id.removeprefix("req-"))  # what used to seed it
    as_numbered = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=100.0,
                                                        seed=number))[0]  # fmt: skip
    deadline = time.monotonic() + 30
    while not (outputs and outputs[-1].finished):
        assert time.monotonic() < deadline, "the unseeded request never finished"
        time.sleep(0.01)
    assert outputs[-1].token_ids != as_numbered.token_ids


def test_engine_survives_a_failing_request(llm, workload):
    prompts, seen = workload[0], []

    def broken(out: RequestOutput) -> None:
        seen.append(out)
        raise RuntimeError("callback bug")

    llm.engine.submit(prompts[0], SamplingParams(max_tokens=5), broken)
    out = llm.generate([prompts[1]], SamplingParams(max_tokens=3))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert llm.engine.alive
    deadline = time.monotonic() + 30
    while not (seen and seen[-1].finished):
        assert time.monotonic() < deadline, "the broken request never ended"
        time.sleep(0.01)
    # its first token's report failed, so it ended there, as an error naming the failure
    first, last = seen
    assert not first.finished and len(first.token_ids) == 1
    assert last.finish_reason == "error" and "callback bug" in last.error
    assert last.token_ids == first.token_ids


def failing_step(runner, fail):
    """The runner's compiled step, raising where ``fail(call, inputs)`` says, after deleting
    the donated pages as a step that failed on the device leaves them."""
    real, calls = runner._step, []

    def step(params, pages, *inputs):
        calls.append(len(calls))
        if fail(len(calls), inputs):
            jax.tree.map(lambda page: page.delete(), pages)
            raise RuntimeError("injected XLA failure")
        return real(params, pages, *inputs)

    return step, calls


def test_failed_step_rebuilds_the_cache_and_recomputes(llm, workload, monkeypatch):
    prompts, max_tokens, expected = workload
    engine, health = llm.engine, []
    client = TestClient(create_app(llm))
    monkeypatch.setattr(engine_module, "RECOVERY_RETRY_S", 0.05)

    def fail(call: int, inputs) -> bool:
        if call == 6:  # the second rebuild's probe: the engine is still recovering
            health.append((engine.healthy, client.get("/health").status_code))
        return call in (4, 5)  # a step with tokens, then the first rebuild's probe

    step, calls = failing_step(engine.runner, fail)
    monkeypatch.setattr(engine.runner, "_step", step)
    failures = lambda: engine.metrics.registry.get_sample_value(  # noqa: E731
        "jaxstack_step_failures_total"
    )
    before = failures()
    outputs = llm.generate(prompts[:4], [SamplingParams(max_tokens=m) for m in max_tokens[:4]])
    assert [out.token_ids for out in outputs] == expected[:4]
    assert failures() == before + 1  # the failed probe is not a step
    assert len(calls) > 6 and health == [(False, 503)]
    assert engine.healthy and client.get("/health").status_code == 200
    assert engine.cache.num_used == 0


def test_request_that_fails_every_step_ends_with_an_error(llm, workload, monkeypatch):
    prompts, max_tokens, expected = workload
    step, _ = failing_step(llm.engine.runner, lambda call, inputs: inputs[2].num_seqs[0] > 0)
    monkeypatch.setattr(llm.engine.runner, "_step", step)
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=5))[0]
    assert out.finish_reason == "error" and "failed 2 times" in out.error
    assert "injected XLA failure" in out.error and llm.engine.healthy
    monkeypatch.undo()
    again = llm.generate([prompts[0]], SamplingParams(max_tokens=max_tokens[0]))[0]
    assert again.token_ids == expected[0]


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        (
            [1] * 120,
            SamplingParams(max_tokens=9),
            "has 120 tokens and max_tokens is 9: 129 tokens, more than the model's context of 128",
        ),
        ([], SamplingParams(), "empty"),
        ([300], SamplingParams(), "in [0, 259)"),
    ],
)
def test_bad_requests_raise_at_submit(llm, prompt, params, message):
    with pytest.raises(ValueError) as error:
        llm.engine.submit(prompt, params, lambda out: None)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0), ("stop", [""])],
)
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
