"""The continuous-batching `Scheduler`, driven by hand with a fake runner (no torch).

The scheduler is pure Python, and so are these tests: `FakeRunner` stands in for the model
runner and, for every chunk that `samples`, returns a token that is a deterministic function of
the request id and its length. A request's output is therefore known in advance, whatever the
batching, chunking or preemption did to it. `Harness.step` checks the scheduler's invariants
around every `schedule()` → `update()` step (token budget, running cap, block accounting and
reference counts, chunk starts, decode order, FIFO admission, newest-first preemption).
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.params import SamplingParams
from lmforge.infer.request import Request, RequestStatus, TokenLogprob
from lmforge.infer.scheduler import (
    QueueFullError,
    Sampled,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

STOP = 7  # a stop token id that `token_for` never produces

TokenFn = Callable[[Request], int]


def token_for(request_id: str, num_tokens: int) -> int:
    """The fake model's next token after NUM_TOKENS tokens of REQUEST_ID (always >= 100)."""
    return 100 + (zlib.crc32(request_id.encode()) + 31 * num_tokens) % 900


def default_token(request: Request) -> int:
    return token_for(request.request_id, request.num_tokens)


def expected_output(request: Request, n: int) -> list[int]:
    p = len(request.prompt_ids)
    return [token_for(request.request_id, p + i) for i in range(n)]


def make_request(request_id: str, prompt_len: int, **params: Any) -> Request:
    return Request(request_id, list(range(1, prompt_len + 1)), SamplingParams(**params))


class FakeRunner:
    """Returns a `Sampled` for every chunk that samples; records every chunk per request."""

    def __init__(self, token: TokenFn = default_token) -> None:
        self.token = token
        self.chunks: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def __call__(self, out: SchedulerOutput) -> dict[str, Sampled]:
        sampled: dict[str, Sampled] = {}
        for chunk in out.decodes + out.prefills:
            request = chunk.request
            self.chunks[request.request_id].append((chunk.start, chunk.length))
            if chunk.samples:
                sampled[request.request_id] = Sampled(token_id=self.token(request))
        return sampled


def check_blocks(sched: Scheduler) -> None:
    """The block pool agrees with the requests' block tables."""
    pool = sched.blocks
    pool.check()
    refs: dict[int, int] = defaultdict(int)
    for r in sched.running:
        assert len(set(r.block_ids)) == len(r.block_ids), "a block twice in one table"
        assert len(r.block_ids) >= pool.blocks_for(r.num_computed)
        assert len(r.block_ids) <= pool.blocks_for(r.num_tokens)
        assert 0 not in r.block_ids, "the null block was handed out"
        for b in r.block_ids:
            refs[b] += 1
    for b in range(1, pool.num_blocks + 1):
        assert pool.ref_counts[b] == refs.get(b, 0), (b, pool.ref_counts[b], refs.get(b))


def check_state(sched: Scheduler) -> None:
    """Invariants that hold between steps."""
    config = sched.config
    assert len(sched.running) <= config.max_batch
    assert all(r.status is RequestStatus.RUNNING for r in sched.running)
    assert all(0 < r.num_computed < r.num_tokens for r in sched.running)
    assert sched.cache_used == sum(r.num_computed for r in sched.running)
    assert len({id(r) for r in sched.running}) == len(sched.running)
    check_blocks(sched)
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), r.status
        assert r.block_ids == [] and r.num_computed == 0
        assert r not in sched.running


def check_output(
    sched: Scheduler,
    out: SchedulerOutput,
    running_before: list[Request],
    waiting_before: list[Request],
) -> None:
    """Invariants of one `schedule()` result, checked before `update()`."""
    config = sched.config
    assert out.num_tokens <= config.max_batched_tokens
    chunks = out.decodes + out.prefills
    assert len({id(c.request) for c in chunks}) == len(chunks), "a request computes twice"
    for c in chunks:
        assert c.request.status is RequestStatus.RUNNING
        assert c.request in sched.running
        assert c.start == c.request.num_computed, "a chunk must continue where the cache ends"
        assert c.length >= 1 and c.start + c.length <= c.request.num_tokens
        # the block table covers every token the chunk writes
        assert len(c.request.block_ids) * config.block_size >= c.start + c.length
    # decodes: one token each, in arrival order, and every decoding running request decodes
    assert all(c.length == 1 and c.samples for c in out.decodes)
    order = [id(r) for r in sched.running]
    assert [order.index(id(c.request)) for c in out.decodes] == sorted(
        order.index(id(c.request)) for c in out.decodes
    )
    decoding = {id(r) for r in running_before if r in sched.running and r.num_remaining == 1}
    assert {id(c.request) for c in out.decodes} == decoding
    # preemption takes the newest running requests, newest first
    k = len(out.preempted)
    if k:
        assert out.preempted == running_before[::-1][:k]
        for r in out.preempted:
            assert r.status is RequestStatus.PREEMPTED and r.block_ids == []
            assert r.num_computed == 0 and r not in sched.running
        assert list(sched.waiting)[:k] == out.preempted[::-1], "preempted go to the front"
    # admission is first come, first served, from the cached prefix (block-aligned)
    admitted = [c.request for c in out.prefills if any(c.request is w for w in waiting_before)]
    assert admitted == waiting_before[: len(admitted)]
    for c in out.prefills:
        if c.request in admitted:
            assert c.start % config.block_size == 0 and c.start < c.request.num_tokens
            if not config.prefix_caching or c.request.params.echo:
                assert c.start == 0


class Harness:
    def __init__(self, config: SchedulerConfig, token: TokenFn = default_token) -> None:
        self.sched = Scheduler(config)
        self.runner = FakeRunner(token)
        self.requests: dict[str, Request] = {}
        self.steps = 0

    def add(self, request_id: str, prompt_len: int, **params: Any) -> Request:
        request = make_request(request_id, prompt_len, **params)
        self.sched.add(request)
        self.requests[request_id] = request
        return request

    def step(self) -> SchedulerOutput:
        check_state(self.sched)
        running_before = list(self.sched.running)
        waiting_before = list(self.sched.waiting)
        out = self.sched.schedule()
        check_output(self.sched, out, running_before, waiting_before)
        sampled = self.runner(out)
        touched = self.sched.update(out, sampled)
        assert [id(r) for r in touched] == [id(c.request) for c in out.decodes + out.prefills]
        check_state(self.sched)
        self.steps += 1
        return out

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work:
                break
            self.step()
        assert not self.sched.has_work, f"not drained after {max_steps} steps (livelock?)"
        assert self.sched.cache_used == 0
        assert self.sched.blocks.num_used == 0, "blocks leaked"
        check_blocks(self.sched)


def assert_tiles(chunks: list[tuple[int, int]], total: int) -> None:
    """CHUNKS (start, length) cover [0, TOTAL) exactly, in order, without overlap."""
    assert chunks and chunks[0][0] == 0
    for (s0, n0), (s1, _) in itertools.pairwise(chunks):
        assert s1 == s0 + n0
    assert chunks[-1][0] + chunks[-1][1] == total


# -- torch-free ----------------------------------------------------------------------------------


def test_scheduler_modules_do_not_import_torch() -> None:
    code = (
        "import sys, lmforge.infer.scheduler, lmforge.infer.request, lmforge.infer.params; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# -- continuous batching, decodes, chunked prefill ----------------------------------------------


def test_request_added_while_others_decode_is_admitted_at_the_next_step() -> None:
    h = Harness(SchedulerConfig(max_batch=4, max_model_len=64, max_batched_tokens=32))
    a = h.add("a", 5, max_tokens=10)
    b = h.add("b", 3, max_tokens=10)
    out = h.step()
    assert not out.decodes
    assert [(c.request, c.start, c.length) for c in out.prefills] == [(a, 0, 5), (b, 0, 3)]
    out = h.step()
    assert [c.request for c in out.decodes] == [a, b] and not out.prefills

    new = h.add("new", 6, max_tokens=10)
    assert new.status is RequestStatus.WAITING and new in h.sched.waiting
    out = h.step()
    assert [c.request for c in out.decodes] == [a, b]  # the others keep decoding ...
    # ... while the new request joins with its whole prompt
    assert [(c.request, c.start, c.length) for c in out.prefills] == [(new, 0, 6)]
    assert new.status is RequestStatus.RUNNING and len(new.block_ids) == 1
    assert (len(a.output_ids), len(b.output_ids), len(new.output_ids)) == (3, 3, 1)
    out = h.step()
    assert [c.request for c in out.decodes] == [a, b, new] and not out.prefills
    h.run()
    for r in (a, b, new):
        assert r.output_ids == expected_output(r, 10)
        assert r.status is RequestStatus.FINISHED_LENGTH


def test_every_decoding_request_gets_one_token_per_step_in_arrival_order() -> None:
    h = Harness(SchedulerConfig(max_batch=3, max_model_len=64, max_batched_tokens=16))
    a = h.add("a", 4, max_tokens=2)
    b = h.add("b", 4, max_tokens=20)
    c = h.add("c", 4, max_tokens=20)
    h.step()  # all three prefill
    h.step()  # a reaches max_tokens and frees its block
    assert a.status is RequestStatus.FINISHED_LENGTH and a.block_ids == []
    d = h.add("d", 4, max_tokens=20)
    out = h.step()
    assert [x.request for x in out.decodes] == [b, c] and [x.request for x in out.prefills] == [d]
    assert h.sched.running == [b, c, d]
    for _ in range(5):
        before = {r.request_id: len(r.output_ids) for r in h.sched.running}
        out = h.step()
        assert [x.request for x in out.decodes] == [b, c, d]
        assert not out.prefills and out.num_tokens == 3
        for r in (b, c, d):
            assert len(r.output_ids) == before[r.request_id] + 1
    h.run()
    assert [len(r.output_ids) for r in (a, b, c, d)] == [2, 20, 20, 20]


def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget() -> None:
    budget = 8
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=64, max_batched_tokens=budget))
    a = h.add("a", 3, max_tokens=30)
    h.step()
    h.step()
    assert a.num_remaining == 1
    b = h.add("b", 30, max_tokens=3)
    steps = 0
    while not b.output_ids:
        out = h.step()
        steps += 1
        assert out.num_tokens <= budget
        assert [c.request for c in out.decodes] == [a]  # a keeps decoding meanwhile
        assert [c.request for c in out.prefills] == [b]
        assert out.prefills[0].length == min(budget - 1, 30 - out.prefills[0].start)
        reached_end = out.prefills[0].start + out.prefills[0].length == 30
        assert bool(b.output_ids) == reached_end  # only the last chunk samples
        assert steps < 10
    assert steps == 5  # ceil(30 / 7)
    assert_tiles(h.runner.chunks["b"], 30)
    assert h.runner.chunks["b"] == [(0, 7), (7, 7), (14, 7), (21, 7), (28, 2)]
    assert b.output_ids == expected_output(b, 1)
    h.run()
    assert a.output_ids == expected_output(a, 30) and b.output_ids == expected_output(b, 3)


def test_a_prompt_alone_fills_the_whole_budget() -> None:
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=64, max_batched_tokens=8))
    r = h.add("r", 20, max_tokens=2)
    sizes = [h.step().num_tokens for _ in range(3)]
    assert sizes == [8, 8, 4]
    assert h.runner.chunks["r"] == [(0, 8), (8, 8), (16, 4)]
    assert len(r.output_ids) == 1
    h.run()
    assert r.output_ids == expected_output(r, 2)


# -- running cap and blocks -----------------------------------------------------------------------


def test_max_batch_caps_running_requests_and_finishing_makes_room() -> None:
    h = Harness(SchedulerConfig(max_batch=3, max_model_len=64, max_batched_tokens=32))
    a = h.add("a", 2, max_tokens=1)
    b = h.add("b", 2, max_tokens=3)
    c = h.add("c", 2, max_tokens=30)
    extra = h.add("extra", 2, max_tokens=2)
    h.step()
    assert a.status is RequestStatus.FINISHED_LENGTH and a.output_ids == expected_output(a, 1)
    assert extra.status is RequestStatus.WAITING  # three were running during the step
    h.step()
    assert extra.status is RequestStatus.RUNNING
    h.step()  # extra finishes; b reaches 3 tokens
    assert extra.finished and b.finished and h.sched.running == [c]
    d = h.add("d", 2, max_tokens=30)
    e = h.add("e", 2, max_tokens=30)
    h.step()
    assert h.sched.running == [c, d, e]
    h.run()


def test_blocks_are_allocated_as_tokens_arrive() -> None:
    config = SchedulerConfig(max_batch=2, max_model_len=64, max_batched_tokens=64, block_size=4)
    h = Harness(config)
    r = h.add("r", 5, max_tokens=20)  # 5 prompt tokens: 2 blocks at admission
    assert h.sched.blocks.num_used == 0
    h.step()
    assert len(r.block_ids) == 2 and r.num_computed == 5 and r.num_tokens == 6
    sizes = []
    while not r.finished:
        h.step()
        sizes.append(len(r.block_ids))
    # one more block each time the next token to compute starts one
    assert sizes[:8] == [2, 2, 2, 3, 3, 3, 3, 4]
    assert h.sched.blocks.num_used == 0


def test_pool_size_counts_blocks_not_requests() -> None:
    # 8 blocks of 4: room for four 2-block prompts at once, not for max_batch × max_model_len
    config = SchedulerConfig(
        max_batch=8,
        max_model_len=32,
        max_batched_tokens=64,
        block_size=4,
        cache_tokens=32,
        prefix_caching=False,  # the prompts are equal: they would share their first block
    )
    h = Harness(config)
    reqs = [h.add(f"r{i}", 7, max_tokens=1) for i in range(6)]
    h.step()
    assert [r.finished for r in reqs] == [True] * 4 + [False] * 2  # two waited for blocks
    assert h.sched.blocks.num_used == 0  # finished at once: their blocks are back
    h.run()


# -- finishing -----------------------------------------------------------------------------------


def stop_at(index: int) -> TokenFn:
    """A runner token function that produces STOP as output token INDEX."""

    def token(request: Request) -> int:
        return STOP if len(request.output_ids) == index else default_token(request)

    return token


def test_stop_token_finishes_as_stopped() -> None:
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=64), token=stop_at(2))
    r = h.add("r", 5, max_tokens=10, stop_token_ids=[3, STOP])
    h.run()
    assert r.status is RequestStatus.FINISHED_STOPPED and r.status.finish_reason == "stop"
    assert r.output_ids == [*expected_output(r, 2), STOP]
    assert r.block_ids == [] and r.num_computed == 0


def test_stop_token_is_ignored_with_ignore_eos() -> None:
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=64), token=stop_at(2))
    r = h.add("r", 5, max_tokens=6, stop_token_ids=[STOP], ignore_eos=True)
    h.run()
    assert r.status is RequestStatus.FINISHED_LENGTH
    assert len(r.output_ids) == 6 and r.output_ids[2] == STOP


def test_stop_on_the_first_token() -> None:
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=64), token=stop_at(0))
    r = h.add("r", 5, max_tokens=6, stop_token_ids=[STOP])
    h.step()
    assert r.status is RequestStatus.FINISHED_STOPPED and r.output_ids == [STOP]
    assert not h.sched.has_work


def test_max_tokens_finishes_as_length() -> None:
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=64))
    r = h.add("r", 5, max_tokens=4)
    h.run()
    assert h.steps == 4
    assert r.status is RequestStatus.FINISHED_LENGTH and r.status.finish_reason == "length"
    assert r.output_ids == expected_output(r, 4)


def test_reaching_max_model_len_finishes_as_length() -> None:
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=16, max_batched_tokens=16))
    r = h.add("r", 10, max_tokens=100)
    edge = h.add("edge", 15, max_tokens=100)  # max_model_len - 1: room for one token
    h.run()
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 16
    assert r.output_ids == expected_output(r, 6)
    assert edge.status is RequestStatus.FINISHED_LENGTH and edge.output_ids == expected_output(
        edge, 1
    )


def test_max_tokens_zero_finishes_after_the_prefill_without_output() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=2, max_model_len=64, max_batched_tokens=4))
    r = make_request("r", 10, max_tokens=0)
    sched.add(r)
    chunks = []
    for _ in range(10):
        if not sched.has_work:
            break
        out = sched.schedule()
        chunks += [(c.start, c.length) for c in out.prefills]
        sched.update(out, {})  # nothing is sampled for a prompt-only request
    assert chunks == [(0, 4), (4, 4), (8, 2)]
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_ids == []
    assert r.block_ids == [] and sched.cache_used == 0 and not sched.has_work


def test_update_records_logprobs_and_echo_prompt_logprobs() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=2, max_model_len=32, max_batched_tokens=3))
    r = make_request("r", 5, max_tokens=2, logprobs=True, echo=True)
    sched.add(r)
    assert r.prompt_logprobs == [None]
    for expected_start in (0, 3):  # the prompt in two chunks
        out = sched.schedule()
        (chunk,) = out.prefills
        assert chunk.start == expected_start
        covered = range(max(chunk.start, 1), chunk.start + chunk.length)
        prompt_lps = {"r": [TokenLogprob(i, -0.5) for i in covered]}
        sampled = {"r": Sampled(42, TokenLogprob(42, -0.25))} if chunk.samples else {}
        sched.update(out, sampled, prompt_lps)
    assert r.prompt_logprobs is not None and len(r.prompt_logprobs) == 5
    assert [lp.token_id for lp in r.prompt_logprobs[1:] if lp is not None] == [1, 2, 3, 4]
    assert r.output_ids == [42] and [lp.logprob for lp in r.logprobs] == [-0.25]
    out = sched.schedule()
    sched.update(out, {"r": Sampled(43)})  # no logprob given: none recorded
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_ids == [42, 43]
    assert len(r.logprobs) == 1


# -- preemption ----------------------------------------------------------------------------------


def test_decodes_preempt_the_newest_request_which_recomputes_later() -> None:
    config = SchedulerConfig(
        max_batch=4,
        max_model_len=16,
        max_batched_tokens=16,
        cache_tokens=16,
        block_size=4,
        prefix_caching=False,  # recompute from 0 (see test_preempted_request_reuses_its_blocks)
    )
    h = Harness(config)
    a = h.add("a", 4, max_tokens=11)
    b = h.add("b", 4, max_tokens=11)
    h.step()
    c = h.add("c", 8, max_tokens=4)  # cannot fit while a and b grow
    preempt_out = None
    for _ in range(20):
        out = h.step()
        assert c.status is RequestStatus.WAITING
        if out.preempted:
            preempt_out = out
            break
    assert preempt_out is not None, "the cache never filled up"
    assert preempt_out.preempted == [b]  # the newest, not a
    assert [x.request for x in preempt_out.decodes] == [a]
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert b.num_computed == 0 and b.block_ids == []
    assert list(h.sched.waiting) == [b, c]  # the front of the queue, before c
    tokens_at_preemption = b.num_tokens
    assert tokens_at_preemption == 9 and len(b.output_ids) == 5
    chunks_before = len(h.runner.chunks["b"])

    for _ in range(40):
        if b.status is RequestStatus.RUNNING:
            break
        h.step()
        assert h.sched.cache_used <= config.cache_capacity
    assert b.status is RequestStatus.RUNNING and a.finished
    assert c.status is RequestStatus.WAITING  # first come, first served: b goes first
    while b.num_remaining > 1 or len(h.runner.chunks["b"]) == chunks_before:
        h.step()
    recompute = h.runner.chunks["b"][chunks_before:]
    assert_tiles(recompute, tokens_at_preemption)  # prompt + output so far, from 0
    h.run()
    assert a.output_ids == expected_output(a, 11)
    assert b.output_ids == expected_output(b, 11)  # the same output as without preemption
    assert c.output_ids == expected_output(c, 4)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in (a, b, c))
    assert (a.num_preemptions, c.num_preemptions) == (0, 0)


def test_recompute_after_preemption_is_chunked_by_the_budget() -> None:
    config = SchedulerConfig(
        max_batch=2,
        max_model_len=16,
        max_batched_tokens=3,
        cache_tokens=16,
        block_size=4,
        prefix_caching=False,  # recompute from 0 (see test_preempted_request_reuses_its_blocks)
    )
    h = Harness(config)
    a = h.add("a", 3, max_tokens=12)
    b = h.add("b", 3, max_tokens=12)
    victims: list[Request] = []
    for _ in range(50):
        victims = h.step().preempted
        if victims:
            break
    assert victims == [b], "the cache never filled up"
    tokens, seen, outputs = b.num_tokens, len(h.runner.chunks["b"]), len(b.output_ids)
    for _ in range(50):
        h.step()
        if len(b.output_ids) > outputs:
            break  # prompt + output recomputed, the next token sampled
    recompute = h.runner.chunks["b"][seen:]
    assert_tiles(recompute, tokens)
    assert len(recompute) > 1 and all(n <= 3 for _, n in recompute)
    assert len(b.output_ids) == tokens - len(b.prompt_ids) + 1
    h.run()
    assert a.output_ids == expected_output(a, 12) and b.output_ids == expected_output(b, 12)
    assert b.num_preemptions >= 1


def test_many_requests_under_a_tiny_cache_all_finish() -> None:
    config = SchedulerConfig(
        max_batch=4,
        max_model_len=12,
        max_batched_tokens=5,
        cache_tokens=12,
        block_size=4,
        prefix_caching=False,  # recompute from 0 (see test_preempted_request_reuses_its_blocks)
    )
    h = Harness(config)
    reqs = [h.add(f"r{i}", 1 + i % 6, max_tokens=20) for i in range(10)]
    h.run(max_steps=600)
    assert sum(r.num_preemptions for r in reqs) > 0
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 12
        assert r.output_ids == expected_output(r, 12 - len(r.prompt_ids))


# -- prefix caching ------------------------------------------------------------------------------


def cache_config(**kwargs: Any) -> SchedulerConfig:
    values: dict[str, Any] = {
        "max_batch": 4,
        "max_model_len": 64,
        "max_batched_tokens": 64,
        "block_size": 4,
    }
    return SchedulerConfig(**{**values, **kwargs})


def add_prompt(h: Harness, request_id: str, prompt: list[int], **params: Any) -> Request:
    request = Request(request_id, prompt, SamplingParams(**params))
    h.sched.add(request)
    h.requests[request_id] = request
    return request


def test_a_repeated_prefix_is_computed_once() -> None:
    h = Harness(cache_config())
    system = list(range(100, 118))  # 18 tokens: 4 full blocks of 4, 2 more
    a = add_prompt(h, "a", [*system, 1, 2], max_tokens=2)
    h.run()
    assert a.num_cached_tokens == 0 and h.runner.chunks["a"][0] == (0, 20)
    b = add_prompt(h, "b", [*system, 3, 4, 5], max_tokens=2)
    out = h.step()
    # the 4 full blocks of the system prompt come from the cache; the rest is computed
    assert [(c.request, c.start, c.length) for c in out.prefills] == [(b, 16, 5)]
    assert b.num_cached_tokens == 16
    stats = h.sched.blocks.stats
    assert (stats.queries, stats.hits) == (20 + 21, 16)
    h.run()
    assert b.output_ids == expected_output(b, 2)


def test_a_prompt_of_whole_blocks_recomputes_its_last_block() -> None:
    h = Harness(cache_config())
    prompt = list(range(200, 216))  # exactly 4 blocks
    add_prompt(h, "a", prompt, max_tokens=1)
    h.run()
    b = add_prompt(h, "b", prompt, max_tokens=1)
    out = h.step()
    # the last token is computed for its logits, so its block is not taken from the cache
    assert [(c.start, c.length) for c in out.prefills] == [(12, 4)]
    assert b.num_cached_tokens == 12


def test_choices_of_one_prompt_wait_for_its_prefill() -> None:
    # n = 3: three requests with one prompt, queued together
    h = Harness(cache_config(max_batched_tokens=8))
    prompt = list(range(300, 322))  # 22 tokens: 5 full blocks
    choices = [add_prompt(h, f"c{i}", prompt, max_tokens=3) for i in range(3)]
    while choices[0].num_remaining > 1 or not choices[0].output_ids:
        h.step()
        assert all(c.status is RequestStatus.WAITING for c in choices[1:])
    h.run()
    computed = {c.request_id: sum(n for _, n in h.runner.chunks[c.request_id]) for c in choices}
    assert computed["c0"] == 22 + 2  # the prompt, then two decodes
    assert computed["c1"] == computed["c2"] == 22 - 20 + 2  # 20 tokens came from the cache
    for c in choices:
        assert c.output_ids == expected_output(c, 3)


def test_echo_requests_compute_every_prompt_token() -> None:
    h = Harness(cache_config())
    prompt = list(range(400, 420))
    add_prompt(h, "a", prompt, max_tokens=1)
    h.run()
    e = add_prompt(h, "e", prompt, max_tokens=1, echo=True)
    out = h.step()
    assert [(c.start, c.length) for c in out.prefills] == [(0, 20)] and e.num_cached_tokens == 0


def test_preempted_request_reuses_its_blocks() -> None:
    config = cache_config(max_batch=2, max_model_len=16, max_batched_tokens=16, cache_tokens=24)
    h = Harness(config)
    a = h.add("a", 4, max_tokens=11)
    b = add_prompt(h, "b", [9, 8, 7, 6], max_tokens=11)
    victims: list[Request] = []
    while not victims:
        victims = h.step().preempted
    assert victims == [b]
    tokens, seen = b.num_tokens, len(h.runner.chunks["b"])
    while b.status is not RequestStatus.RUNNING:
        h.step()
    start, _ = h.runner.chunks["b"][seen]
    assert start > 0 and start % 4 == 0 and start <= tokens - 1  # its full blocks were cached
    h.run()
    assert b.output_ids == expected_output(b, 11) and a.output_ids == expected_output(a, 11)


def test_cached_blocks_are_evicted_least_recently_used_first() -> None:
    # 9 blocks of 4; 9-token prompts: 3 blocks, the first 2 cached once computed
    h = Harness(cache_config(max_batch=1, max_model_len=24, cache_tokens=36))
    x, y = list(range(10, 19)), list(range(30, 39))
    for name, prompt in (("x", x), ("y", y), ("x2", x)):  # x2 makes x the most recent
        add_prompt(h, name, prompt, max_tokens=1)
        h.run()
    pool = h.sched.blocks
    assert h.requests["x2"].num_cached_tokens == 8
    assert len(pool.cached) == 4 and pool.num_free == 9  # cached, in nobody's table
    add_prompt(h, "big", list(range(50, 73)), max_tokens=1)  # 6 blocks: 5 never used + 1
    h.run()
    assert pool.stats.evictions == 1  # y's tail block: the least recently used
    x3 = add_prompt(h, "x3", x, max_tokens=1)
    h.run()
    y2 = add_prompt(h, "y2", y, max_tokens=1)
    h.run()
    assert x3.num_cached_tokens == 8  # x's blocks survived
    assert y2.num_cached_tokens == 4  # y kept its first block only


def test_without_prefix_caching_nothing_is_shared() -> None:
    h = Harness(cache_config(prefix_caching=False))
    prompt = list(range(100, 120))
    add_prompt(h, "a", prompt, max_tokens=1)
    h.run()
    b = add_prompt(h, "b", prompt, max_tokens=1)
    h.step()
    assert b.num_cached_tokens == 0 and h.runner.chunks["b"] == [(0, 20)]
    assert not h.sched.blocks.cached


# -- the queue and bad prompts -------------------------------------------------------------------


def test_queue_cap_refuses_one_more() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=2, max_model_len=16, max_queue=3))
    runner = FakeRunner()
    for i in range(3):
        sched.add(make_request(f"r{i}", 2))
    extra = make_request("extra", 2)
    with pytest.raises(QueueFullError, match="3 requests waiting"):
        sched.add(extra)
    assert isinstance(QueueFullError("x"), LmforgeError)
    assert len(sched.waiting) == 3 and extra not in sched.waiting
    out = sched.schedule()
    sched.update(out, runner(out))  # two are admitted: room for two more
    assert len(sched.waiting) == 1
    sched.add(extra)
    sched.add(make_request("more", 2))
    with pytest.raises(QueueFullError):
        sched.add(make_request("one-too-many", 2))


@pytest.mark.parametrize("prompt_len", [16, 17, 100])
def test_prompt_without_room_for_a_token_is_refused(prompt_len: int) -> None:
    sched = Scheduler(SchedulerConfig(max_batch=2, max_model_len=16))
    with pytest.raises(LmforgeError, match="max_model_len 16"):
        sched.add(make_request("r", prompt_len))
    assert not sched.has_work
    sched.add(make_request("ok", 15))
    assert sched.has_work


# -- abort ---------------------------------------------------------------------------------------


def test_abort_a_waiting_request() -> None:
    h = Harness(SchedulerConfig(max_batch=1, max_model_len=32))
    a = h.add("a", 3, max_tokens=5)
    b = h.add("b", 3, max_tokens=5)
    h.step()
    assert b.status is RequestStatus.WAITING
    assert h.sched.abort("b") is b
    assert b.status is RequestStatus.FINISHED_ABORTED and b.status.finish_reason == "abort"
    assert b not in h.sched.waiting and b.finished_at is not None
    assert h.sched.abort("b") is None
    h.run()
    assert a.output_ids == expected_output(a, 5) and b.output_ids == []


def test_abort_a_running_request_frees_its_blocks() -> None:
    h = Harness(SchedulerConfig(max_batch=2, max_model_len=32))
    a = h.add("a", 3, max_tokens=20)
    b = h.add("b", 5, max_tokens=20)
    for _ in range(3):
        h.step()
    assert h.sched.cache_used == a.num_computed + b.num_computed == 5 + 7
    assert h.sched.abort("a") is a
    assert a.status is RequestStatus.FINISHED_ABORTED and a.block_ids == []
    assert a.num_computed == 0 and a not in h.sched.running
    assert h.sched.blocks.num_used == len(b.block_ids) and h.sched.cache_used == b.num_computed
    c = h.add("c", 2, max_tokens=3)
    h.step()
    assert c.status is RequestStatus.RUNNING
    h.run()
    assert len(a.output_ids) == 3 and b.output_ids == expected_output(b, 20)


def test_abort_during_a_step_is_skipped_by_update() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=2, max_model_len=32))
    a = make_request("a", 4, max_tokens=5)
    b = make_request("b", 4, max_tokens=5)
    sched.add(a)
    sched.add(b)
    runner = FakeRunner()
    first = sched.schedule()
    sched.update(first, runner(first))  # both prefill and sample a token
    out = sched.schedule()
    sampled = runner(out)
    assert sched.abort("a") is a
    touched = sched.update(out, sampled)
    assert touched == [b]
    assert len(a.output_ids) == 1 and len(b.output_ids) == 2  # a got nothing from this step
    assert a.num_computed == 0 and a.block_ids == [] and sched.cache_used == b.num_computed == 5
    check_state(sched)


def test_abort_a_preempted_request() -> None:
    h = Harness(
        SchedulerConfig(
            max_batch=2, max_model_len=8, max_batched_tokens=8, cache_tokens=8, block_size=2
        )
    )
    a = h.add("a", 2, max_tokens=5)
    b = h.add("b", 2, max_tokens=5)
    for _ in range(20):
        if h.step().preempted:
            break
    assert b.status is RequestStatus.PREEMPTED
    assert h.sched.abort("b") is b and b.status is RequestStatus.FINISHED_ABORTED
    assert not h.sched.waiting
    h.run()
    assert a.output_ids == expected_output(a, 5)


def test_abort_unknown_id_returns_none() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=2, max_model_len=16))
    sched.add(make_request("a", 2))
    assert sched.abort("nope") is None
    assert len(sched.waiting) == 1


# -- the Request state machine -------------------------------------------------------------------

S = RequestStatus
LEGAL = {
    (S.WAITING, S.RUNNING),
    (S.WAITING, S.FINISHED_ABORTED),
    (S.RUNNING, S.PREEMPTED),
    (S.RUNNING, S.FINISHED_STOPPED),
    (S.RUNNING, S.FINISHED_LENGTH),
    (S.RUNNING, S.FINISHED_ABORTED),
    (S.PREEMPTED, S.RUNNING),
    (S.PREEMPTED, S.FINISHED_ABORTED),
    (S.WAITING, S.FINISHED_ERROR),
    (S.RUNNING, S.FINISHED_ERROR),
    (S.PREEMPTED, S.FINISHED_ERROR),
}
ALL_PAIRS = [(a, b) for a in RequestStatus for b in RequestStatus]


@pytest.mark.parametrize(
    ("src", "dst"), [p for p in ALL_PAIRS if p not in LEGAL], ids=lambda s: s.value
)
def test_illegal_transition_raises(src: RequestStatus, dst: RequestStatus) -> None:
    request = make_request("r", 2)
    request.status = src
    with pytest.raises(RuntimeError, match="not allowed"):
        request.move_to(dst)
    assert request.status is src


@pytest.mark.parametrize(("src", "dst"), sorted(LEGAL, key=str), ids=lambda s: s.value)
def test_legal_transition(src: RequestStatus, dst: RequestStatus) -> None:
    request = make_request("r", 2)
    request.status = src
    request.move_to(dst)
    assert request.status is dst
    assert (request.finished_at is not None) == dst.finished


def test_illegal_transitions_cover_the_examples() -> None:
    assert (S.WAITING, S.FINISHED_LENGTH) not in LEGAL
    assert all((f, s) not in LEGAL for f in S if f.finished for s in S)
    assert len(ALL_PAIRS) - len(LEGAL) == 38


# -- SchedulerConfig -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 8, "max_batched_tokens": 7}, "max_batched_tokens"),
        ({"max_model_len": 64, "cache_tokens": 63}, "cache_tokens"),
        ({"cache_tokens": 0}, "cache_tokens"),
        ({"cache_tokens": -5}, "cache_tokens"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": -1}, "max_batch"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_batched_tokens": 0}, "max_batched_tokens"),
        ({"max_queue": 0}, "max_queue"),
        ({"max_queue": -3}, "max_queue"),
        ({"max_batch": 2.5}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"cache_tokens": 4096.5}, "cache_tokens"),
        ({"cache_tokens": "4096"}, "cache_tokens"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LmforgeError, match=message):
        SchedulerConfig(**kwargs)


def test_config_cache_capacity() -> None:
    assert SchedulerConfig(max_batch=4, max_model_len=32).cache_capacity == 128
    config = SchedulerConfig(max_batch=4, max_model_len=32, cache_tokens=40)
    assert config.cache_capacity == 40
    assert SchedulerConfig(max_batch=4, max_batched_tokens=4).max_batched_tokens == 4


# -- randomized invariants -----------------------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_arrivals_aborts_and_preemptions_keep_the_invariants(
    seed: int, caching: bool
) -> None:
    rng = random.Random(seed)
    config = SchedulerConfig(
        max_batch=4,
        max_model_len=24,
        max_batched_tokens=10,
        cache_tokens=30,
        max_queue=6,
        block_size=4,
        prefix_caching=caching,  # the prompts 1..n share prefixes
    )
    h = Harness(config)
    aborted: set[str] = set()
    refused = 0
    preemptions = 0
    next_id = 0
    for _ in range(200):
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            rid = f"r{next_id}"
            next_id += 1
            try:
                h.add(rid, rng.randint(1, 20), max_tokens=rng.randint(0, 15))
            except QueueFullError:
                refused += 1
                h.requests.pop(rid, None)
        live = [r for r in h.requests.values() if not r.finished]
        if live and rng.random() < 0.04:
            victim = rng.choice(live)
            assert h.sched.abort(victim.request_id) is victim
            aborted.add(victim.request_id)
        if not h.sched.has_work:
            continue
        if rng.random() < 0.03 and h.sched.running:
            # abort while the step "runs": update must skip the request
            check_state(h.sched)
            running_before, waiting_before = list(h.sched.running), list(h.sched.waiting)
            out = h.sched.schedule()
            check_output(h.sched, out, running_before, waiting_before)
            sampled = h.runner(out)
            in_flight = rng.choice(h.sched.running) if h.sched.running else None
            if in_flight is not None:
                assert h.sched.abort(in_flight.request_id) is in_flight
                aborted.add(in_flight.request_id)
            touched = h.sched.update(out, sampled)
            assert all(r is not in_flight for r in touched)
            check_state(h.sched)
        else:
            out = h.step()
        preemptions += len(out.preempted)
    h.run(max_steps=2000)

    assert preemptions > 0 and aborted and len(h.requests) > 30
    for rid, r in h.requests.items():
        assert r.finished, rid
        n = len(r.output_ids)
        assert r.output_ids == expected_output(r, n)
        if rid in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            continue
        assert r.status is RequestStatus.FINISHED_LENGTH, (rid, r.status)
        context_end = r.num_tokens == config.max_model_len
        assert n == r.params.max_tokens or (context_end and n < r.params.max_tokens), rid
