"""The continuous-batching engine against the static-batch reference generate(), and the async step loop."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch
import transformers
from prometheus_client import generate_latest

from model.generation import generate
from model.mixtral import KVCache, Mixtral
from model.sampling import SamplingParams
from router.engine import AsyncEngine, Engine
from router.errors import STATUS_INTERNAL, STATUS_UNAVAILABLE, InvalidRequest
from router.metrics import RouterMetrics
from router.requests import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineDeadError,
    GenerationRequest,
    QueueFullError,
)
from router.scheduler import EngineConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    d = tmp_path_factory.mktemp("mixtral")
    transformers.MixtralForCausalLM(cfg).save_pretrained(d)
    yield Mixtral.from_pretrained(d)
    torch.set_num_threads(threads)


_REFERENCE: dict = {}


def reference(model: Mixtral, prompt: list[int], params: SamplingParams) -> list[int]:
    """generate() for the prompt alone, memoized."""
    key = (tuple(prompt), params)
    if key not in _REFERENCE:
        _REFERENCE[key] = generate(model, [prompt], params)[0][0]
    return _REFERENCE[key]


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def request(rid: str, ids: list[int], params: SamplingParams,
            logprobs: int | None = None) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=tuple(ids), sampling=params, logprobs=logprobs)


def run(engine: Engine, arrivals: dict[int, list[GenerationRequest]] | None = None, max_steps: int = 10_000):
    """Step until idle, adding arrivals[step] before that step; returns ({id: tokens}, {id: final output})."""
    arrivals = arrivals or {}
    tokens: dict[str, list[int]] = {}
    final = {}
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished():
        for r in arrivals.get(step, []):
            engine.add_request(r)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.token_id for t in out.tokens)
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < max_steps
    return tokens, final


def assert_all_free(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_kv_blocks
    assert stats.num_running == stats.num_waiting == 0


def test_continuous_batching_matches_reference(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=256))
    reqs = [request(str(i), prompt(1 + (i * 37) % 100, i), greedy(1 + (i * 5) % 13)) for i in range(32)]
    arrivals: dict[int, list[GenerationRequest]] = {}
    for i, r in enumerate(reqs):
        arrivals.setdefault((i * 7) % 11, []).append(r)
    tokens, final = run(engine, arrivals)
    for r in reqs:
        assert tokens[r.request_id] == reference(model, list(r.prompt_ids), r.sampling), r.request_id
        out = final[r.request_id]
        assert out.finish_reason == FINISH_LENGTH and out.error is None
        assert out.num_generated_tokens == r.sampling.max_tokens
        m = out.metrics
        assert m["arrival"] <= m["first_scheduled"] <= m["first_token"] <= m["finished"]
    stats = engine.stats()
    assert stats.prompt_tokens_total == sum(len(r.prompt_ids) for r in reqs)
    assert stats.generation_tokens_total == sum(r.sampling.max_tokens for r in reqs)
    assert stats.num_preemptions == 0
    assert_all_free(engine)


def test_chunked_prefill_keeps_decoders_going(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=32))
    decoders = [request(f"d{i}", prompt(n, 100 + i), greedy(16)) for i, n in enumerate((5, 8, 12))]
    long = request("long", prompt(100, 200), greedy(3))
    tokens: dict[str, list[int]] = {}

    def step() -> set[str]:
        got = set()
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.token_id for t in out.tokens)
            got.update(out.request_id for _ in out.tokens)
        assert engine.stats().last_step_tokens <= 32
        return got

    for r in decoders:
        engine.add_request(r)
    assert step() == {"d0", "d1", "d2"}  # 25 prompt tokens fit one step
    engine.add_request(long)
    steps = 0
    while "long" not in tokens:
        assert step() >= {"d0", "d1", "d2"}  # every decoder gets a token every step
        steps += 1
    assert steps == 4  # 100 prompt tokens in chunks of 32 - 3 decode tokens
    for rid, rest in run(engine)[0].items():
        tokens[rid].extend(rest)
    for r in [*decoders, long]:
        assert tokens[r.request_id] == reference(model, list(r.prompt_ids), r.sampling)
    assert_all_free(engine)


def test_preemption_recomputes_identically(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=8))  # 128 slots for 6 sequences of up to 84 tokens
    reqs = [request(str(i), prompt(20 + 8 * i, 300 + i), greedy(24)) for i in range(6)]
    tokens, final = run(engine, {0: reqs})
    for r in reqs:
        assert tokens[r.request_id] == reference(model, list(r.prompt_ids), r.sampling)
        assert final[r.request_id].finish_reason == FINISH_LENGTH
    assert engine.stats().num_preemptions > 0
    assert_all_free(engine)


def test_abort_frees_blocks(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=32, max_num_seqs=2))
    for i in range(4):
        engine.add_request(request(str(i), prompt(30, 400 + i), greedy(50)))
    for _ in range(3):
        engine.step()
    stats = engine.stats()
    assert stats.num_running == 2 and stats.num_waiting == 2 and stats.num_free_blocks < 32
    assert engine.abort("0") and engine.abort("3")  # one running, one waiting
    assert not engine.abort("nope")
    assert engine.stats().num_running == 1 and engine.stats().num_waiting == 1
    outs = {o.request_id: o for o in engine.step()}
    assert outs["0"].finished and outs["0"].finish_reason == FINISH_ABORT and outs["0"].error is None
    assert outs["3"].finish_reason == FINISH_ABORT
    for rid in ("1", "2"):
        engine.abort(rid)
    assert_all_free(engine)
    assert {o.request_id for o in engine.step()} == {"1", "2"}
    assert not engine.has_unfinished()


def test_abort_during_forward_takes_effect_after_it(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=32))
    for rid in ("a", "b"):
        engine.add_request(request(rid, prompt(20, 0), greedy(5)))
    inner = model.experts

    def abort_midway(*args):  # as another thread would, while the forward runs
        engine.abort("a")
        assert engine.stats().num_free_blocks < 32  # its blocks are still in use by this forward
        return inner(*args)

    model.experts = abort_midway
    try:
        outs = {o.request_id: o for o in engine.step()}
    finally:
        model.experts = inner
    assert outs["a"].finish_reason == FINISH_ABORT and outs["a"].tokens == ()
    assert len(outs["b"].tokens) == 1 and not outs["b"].finished
    assert engine.stats().num_running == 1
    run(engine)
    assert_all_free(engine)


def test_waiting_queue_is_bounded(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=32, max_waiting=3))
    for i in range(3):
        engine.add_request(request(str(i), prompt(4, i), greedy(2)))
    with pytest.raises(QueueFullError):
        engine.add_request(request("3", prompt(4, 3), greedy(2)))
    engine.step()  # admits the waiting ones
    engine.add_request(request("3", prompt(4, 3), greedy(2)))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(request("3", prompt(4, 3), greedy(2)))


def test_requests_that_cannot_fit_are_rejected(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=4))  # 64 KV slots
    assert engine.max_request_tokens == 64 and engine.max_model_len == 512
    cases = [(engine, request("a", prompt(50, 0), greedy(20)), "max_tokens", "KV cache holds at most 64"),
             (engine, request("a2", prompt(70, 0), greedy(1)), "prompt", "KV cache holds at most 64")]
    big = Engine(model, EngineConfig(num_kv_blocks=64))
    cases += [(big, request("b", prompt(500, 0), greedy(20)), "max_tokens", "maximum context length is 512"),
              (big, request("b2", prompt(512, 0), greedy(1)), "prompt", "leaving no room"),
              (big, request("c", [], greedy(1)), "prompt", "empty"),
              (big, request("c2", [5, 300], greedy(1)), "prompt", "token id 300 is out of vocabulary"),
              (big, request("d", [5], greedy(0)), "max_tokens", "at least 1"),
              (big, request("t", [5], SamplingParams(temperature=float("nan"))), "temperature", "finite"),
              (big, request("p", [5], SamplingParams(top_p=0.0)), "top_p", "(0, 1]"),
              (big, request("k", [5], SamplingParams(top_k=-2)), "top_k", "-1, 0 or positive"),
              (big, request("s", [5], SamplingParams(seed=2**64)), "seed", "64-bit"),
              (big, request("st", [5], SamplingParams(stop_token_ids=(7, 300))), "stop_token_ids", "300"),
              (big, request("lb", [5], SamplingParams(logit_bias=((3, 101.0),))), "logit_bias", "[-100, 100]"),
              (big, request("lb2", [5], SamplingParams(logit_bias=((999, 1.0),))), "logit_bias", "999")]
    for eng, r, param, fragment in cases:
        with pytest.raises(InvalidRequest) as e:
            eng.add_request(r)
        assert e.value.param == param and fragment in e.value.message, (r.request_id, e.value)
    chat = GenerationRequest("m", tuple(prompt(600, 0)), greedy(1), prompt_param="messages",
                             max_tokens_param="max_completion_tokens")
    with pytest.raises(InvalidRequest, match="your messages has 600 tokens") as e:
        big.add_request(chat)
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequest) as e:
        big.add_request(GenerationRequest("m2", (5,), greedy(0), max_tokens_param="max_completion_tokens"))
    assert e.value.param == "max_completion_tokens"
    assert_all_free(big) and assert_all_free(engine)
    engine.add_request(request("e", prompt(50, 0), greedy(14)))  # exactly fits
    per_block = KVCache.bytes_per_block(model.cfg, 16, model.dtype)
    assert Engine(model, EngineConfig(kv_cache_bytes=10 * per_block + 1)).stats().num_kv_blocks == 10


def test_seeded_sampling_is_independent_of_the_batch(model):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    target = request("t", prompt(17, 500), params)
    alone, _ = run(Engine(model, EngineConfig(num_kv_blocks=64)), {0: [target]})
    crowd = [request(f"c{i}", prompt(5 + 9 * i, 600 + i), SamplingParams(
        max_tokens=10, temperature=0.8, seed=i if i % 2 else None, ignore_eos=True)) for i in range(6)]
    crowd.append(request("g", prompt(40, 700), greedy(8)))
    crowded, _ = run(Engine(model, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=24)),
                     {0: crowd[:3], 2: [target, *crowd[3:]]})
    assert crowded["t"] == alone["t"]
    assert len(alone["t"]) == 12


def test_logprobs_match_log_softmax(model):
    ids = prompt(23, 800)
    r = request("lp", ids, greedy(6), logprobs=5)
    outs = []
    engine = Engine(model, EngineConfig(num_kv_blocks=64))
    engine.add_request(r)
    engine.add_request(request("zero", prompt(9, 801), greedy(3), logprobs=0))
    engine.add_request(request("none", prompt(9, 802), greedy(3)))
    while engine.has_unfinished():
        outs.extend(engine.step())
    toks = [t for o in outs if o.request_id == "lp" for t in o.tokens]
    want, logits = generate(model, [ids], greedy(6), return_logits=True)
    assert [t.token_id for t in toks] == want[0]
    lps = torch.log_softmax(logits[0], dim=-1)
    for t, lp in zip(toks, lps, strict=True):
        assert t.logprob == pytest.approx(float(lp[t.token_id]), abs=1e-4)
        top = torch.topk(lp, 5)
        assert [i for i, _ in t.top_logprobs] == top.indices.tolist()
        assert [v for _, v in t.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    zero = [t for o in outs if o.request_id == "zero" for t in o.tokens]
    assert all(t.logprob is not None and t.top_logprobs == () for t in zero)
    assert all(t.logprob is None for o in outs if o.request_id == "none" for t in o.tokens)


def test_stop_token_ids_and_eos(model):
    ids = prompt(11, 900)
    full = reference(model, ids, greedy(20))
    stop = full[5]
    tokens, final = run(Engine(model, EngineConfig(num_kv_blocks=64)),
                        {0: [request("s", ids, SamplingParams(max_tokens=20, stop_token_ids=(stop,),
                                                               ignore_eos=True))]})
    assert tokens["s"] == full[: full.index(stop) + 1]
    assert final["s"].finish_reason == FINISH_STOP
    # EOS counts unless ignore_eos: same as the reference with the same parameters
    eos_params = SamplingParams(max_tokens=20)
    eos_model = model.cfg.eos_token_id
    tokens, final = run(Engine(model, EngineConfig(num_kv_blocks=64)), {0: [request("e", ids, eos_params)]})
    assert tokens["e"] == reference(model, ids, eos_params)
    assert final["e"].finish_reason == (FINISH_STOP if tokens["e"][-1] == eos_model else FINISH_LENGTH)


def test_eos_stops_at_exactly_the_expected_token(eos_model_dir):
    """A checkpoint built so that greedy decoding after CHAIN[0] gives CHAIN[1:] and then EOS: the engine stops
    there with finish_reason "stop", the EOS token being the last output; ignore_eos runs on to max_tokens."""
    from tests.router.conftest import CHAIN, EOS_AFTER

    eos_model = Mixtral.from_pretrained(eos_model_dir)
    eos = eos_model.cfg.eos_token_id
    ids = [eos_model.cfg.bos_token_id, 5, CHAIN[0]]
    engine = Engine(eos_model, EngineConfig(num_kv_blocks=64))
    tokens, final = run(engine, {0: [request("e", ids, SamplingParams(max_tokens=20)),
                                     request("i", ids, SamplingParams(max_tokens=20, ignore_eos=True))]})
    assert tokens["e"] == [*CHAIN[1:], eos] and len(tokens["e"]) == EOS_AFTER + 1
    assert final["e"].finish_reason == FINISH_STOP
    assert tokens["i"][:EOS_AFTER + 1] == [*CHAIN[1:], eos] and len(tokens["i"]) == 20
    assert final["i"].finish_reason == FINISH_LENGTH
    assert_all_free(engine)


# ---- AsyncEngine -----------------------------------------------------------------------------------------


async def collect(async_engine: AsyncEngine, r: GenerationRequest):
    stream = await async_engine.generate(r)
    outs = [out async for out in stream]
    return [t.token_id for o in outs for t in o.tokens], outs[-1]


async def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def all_free(engine: Engine) -> bool:
    s = engine.stats()
    return s.num_free_blocks == s.num_kv_blocks and s.num_running == s.num_waiting == 0


class FailingExperts:
    """Wraps an expert backend; the next `failures` calls raise as a dead worker would."""

    def __init__(self, inner, failures: int):
        self.inner, self.failures = inner, failures

    def __call__(self, *args):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("expert worker unreachable")
        return self.inner(*args)


@contextlib.contextmanager
def failing_experts(model: Mixtral, failures: int):
    inner = model.experts
    model.experts = FailingExperts(inner, failures)
    try:
        yield
    finally:
        model.experts = inner


def test_async_concurrent_generate(model):
    reqs = [request(str(i), prompt(3 + 11 * i, 1000 + i), greedy(4 + i)) for i in range(8)]

    async def main():
        ae = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64)))
        try:
            results = await asyncio.gather(*(collect(ae, r) for r in reqs))
            for r, (toks, last) in zip(reqs, results, strict=True):
                assert toks == reference(model, list(r.prompt_ids), r.sampling)
                assert last.finished and last.finish_reason == FINISH_LENGTH
            assert all_free(ae.engine)
            with pytest.raises(ValueError):  # admission errors surface from the await, before any output
                await ae.generate(request("big", prompt(500, 0), greedy(20)))
        finally:
            ae.shutdown(drain=True, timeout=10)
        assert not ae.is_alive
        with pytest.raises(EngineDeadError):
            await ae.generate(request("late", [5], greedy(1)))

    asyncio.run(main())


def test_async_queue_full_surfaces_from_generate(model):
    async def main():
        ae = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64, max_num_seqs=1, max_waiting=1)))
        streams = []
        try:
            with pytest.raises(QueueFullError):
                for i in range(3):  # at most one running and one waiting
                    streams.append(await ae.generate(request(str(i), prompt(8, i), greedy(200))))
        finally:
            ae.shutdown(drain=False, timeout=10)
        assert len(streams) in (1, 2)
        last = [o async for o in streams[0]][-1]
        assert last.finish_reason == FINISH_ABORT and last.error

    asyncio.run(main())


def test_async_consumer_cancellation_frees_blocks(model):
    async def main():
        ae = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64)))
        try:
            # leaving the loop early closes the stream
            stream = await ae.generate(request("a", prompt(40, 1), greedy(300)))
            async for out in stream:
                if out.num_generated_tokens >= 2:
                    break
            await stream.aclose()
            await wait_until(lambda: all_free(ae.engine))
            # cancelling the consuming task (client disconnect)
            got = asyncio.Event()

            async def consume():
                async for _ in await ae.generate(request("b", prompt(40, 2), greedy(300))):
                    got.set()

            task = asyncio.create_task(consume())
            await got.wait()
            assert ae.engine.stats().num_running == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: all_free(ae.engine) and not ae.engine.has_unfinished())
        finally:
            ae.shutdown(drain=False, timeout=10)

    asyncio.run(main())


def test_async_failed_step_is_retried_and_loses_nothing(model):
    """A forward that fails once (a worker blip) is retried: nobody fails, outputs are the reference's, and a
    seeded sampler draws the same numbers as without the failure."""
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=11, ignore_eos=True)
    reqs = [request(str(i), prompt(10 + i, 1100 + i), greedy(20)) for i in range(3)]
    reqs.append(request("seeded", prompt(14, 1150), seeded))
    alone, _ = run(Engine(model, EngineConfig(num_kv_blocks=64)), {0: [reqs[-1]]})

    metrics = RouterMetrics()

    async def main():
        ae = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64), metrics=metrics))
        try:
            async def drain(stream):
                return [o async for o in stream]

            with failing_experts(model, failures=1):
                streams = [await ae.generate(r) for r in reqs]
                results = await asyncio.gather(*(drain(s) for s in streams))
            for r, outs in zip(reqs, results, strict=True):
                toks = [t.token_id for o in outs for t in o.tokens]
                assert outs[-1].finish_reason == FINISH_LENGTH and outs[-1].error is None
                want = alone["seeded"] if r.request_id == "seeded" else reference(model, list(r.prompt_ids),
                                                                                  r.sampling)
                assert toks == want, r.request_id
            assert ae.engine.stats().failed_steps_total == 1
            assert "expertmesh_failed_forwards_total 1.0" in generate_latest(metrics.registry).decode()
            assert all_free(ae.engine) and ae.is_alive
        finally:
            ae.shutdown(drain=True, timeout=10)
            metrics.detach()

    asyncio.run(main())


def test_persistent_failure_fails_requests_never_the_engine(model):
    """Every forward fails: the requests then in flight fail (500), the engine stays up, and serves again
    correctly once the fault clears."""
    async def main():
        ae = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64, step_retry_delays_s=(0.0, 0.01))))
        try:
            with failing_experts(model, failures=10**9):
                for i in range(4):
                    _, last = await collect(ae, request(str(i), [5, 6, 7], greedy(3)))
                    assert last.finish_reason == FINISH_ABORT and "expert worker unreachable" in last.error
                    assert last.error_status == STATUS_INTERNAL
                assert ae.is_alive and all_free(ae.engine)
            after = request("after", prompt(12, 1200), greedy(6))
            toks, last = await collect(ae, after)
            assert toks == reference(model, list(after.prompt_ids), after.sampling) and last.error is None
        finally:
            ae.shutdown(drain=False, timeout=10)

    asyncio.run(main())


POISON = 299  # a token whose embedding the tests below make NaN, or whose forward they make raise


@contextlib.contextmanager
def poisoned_forward(model: Mixtral):
    """The forward raises whenever its batch holds the POISON token (a request that breaks the model)."""
    inner = model.forward

    def forward(input_ids, batch, kv):
        if bool((input_ids == POISON).any()):
            raise RuntimeError("poisoned input")
        return inner(input_ids, batch, kv)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def nan_embedding(model: Mixtral):
    saved = model.embed[POISON].clone()
    model.embed[POISON] = float("nan")
    try:
        yield
    finally:
        model.embed[POISON] = saved


@pytest.mark.parametrize("fault", ["raising_forward", "nan_logits"])
def test_a_bad_request_fails_alone(model, fault):
    """One request breaks the forward (or yields NaN logits) in a batch of greedy streams: only it fails, with
    a clear error; the others' tokens equal the reference; the engine goes on."""
    good = [request(f"g{i}", prompt(8 + 3 * i, 1300 + i), greedy(10)) for i in range(5)]
    bad = request("bad", [5, 6, POISON, 7], greedy(10))
    ctx = poisoned_forward(model) if fault == "raising_forward" else nan_embedding(model)
    engine = Engine(model, EngineConfig(num_kv_blocks=128, step_retry_delays_s=(0.0,)))
    with ctx:
        tokens, final = run(engine, {0: good[:3] + [bad], 2: good[3:]})
    for r in good:
        assert tokens[r.request_id] == reference(model, list(r.prompt_ids), r.sampling), r.request_id
        assert final[r.request_id].finish_reason == FINISH_LENGTH and final[r.request_id].error is None
    out = final["bad"]
    assert out.finish_reason == FINISH_ABORT and out.error_status == STATUS_INTERNAL
    assert ("poisoned input" if fault == "raising_forward" else "non-finite logits") in out.error
    assert tokens.get("bad", []) == []
    assert_all_free(engine)


def test_tiny_temperature_and_top_p_are_safe(model):
    """temperature 1e-300 used to overflow to inf/NaN probabilities; it is greedy now. top_p 1e-300 keeps the
    most likely token."""
    ids = prompt(9, 1400)
    want = reference(model, ids, greedy(8))
    reqs = [request("t", ids, SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True)),
            request("p", ids, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-300, seed=1,
                                             ignore_eos=True)),
            request("g", ids, greedy(8))]
    tokens, final = run(Engine(model, EngineConfig(num_kv_blocks=64)), {0: reqs})
    assert tokens == {"t": want, "p": want, "g": want}
    assert all(f.error is None for f in final.values())


def test_logit_bias_steers_sampling(model):
    ids = prompt(9, 1500)
    biased = SamplingParams(max_tokens=4, logit_bias=((42, 100.0),), ignore_eos=True)
    tokens, _ = run(Engine(model, EngineConfig(num_kv_blocks=64)), {0: [request("b", ids, biased)]})
    assert tokens["b"] == [42] * 4
    banned = reference(model, ids, greedy(1))[0]
    params = SamplingParams(max_tokens=1, logit_bias=((banned, -100.0),), ignore_eos=True)
    tokens, _ = run(Engine(model, EngineConfig(num_kv_blocks=64)), {0: [request("n", ids, params)]})
    assert tokens["n"] != [banned]


def test_queue_timeout_fails_only_the_waiting_request(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=64, max_num_seqs=1, queue_timeout_s=0.2))
    first = request("first", prompt(6, 1600), greedy(40))
    engine.add_request(first)
    engine.step()
    engine.add_request(request("late", prompt(6, 1601), greedy(4)))
    tokens: dict = {}
    final: dict = {}
    deadline = time.monotonic() + 30
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.token_id for t in out.tokens)
            if out.finished:
                final[out.request_id] = out
        time.sleep(0.01)
    assert final["late"].error_status == STATUS_UNAVAILABLE and "queue timeout" in final["late"].error
    assert final["first"].finish_reason == FINISH_LENGTH and len(tokens["first"]) == 39  # + 1 from step one
    assert_all_free(engine)


def test_async_shutdown_drains_in_flight(model):
    async def main():
        ae = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64)))
        r = request("d", prompt(9, 3), greedy(30))
        stream = await ae.generate(r)
        await asyncio.to_thread(ae.shutdown, True, 10)
        outs = [o async for o in stream]
        assert outs[-1].finish_reason == FINISH_LENGTH and outs[-1].num_generated_tokens == 30
        assert not ae.is_alive

    asyncio.run(main())
