"""Scheduler + BlockManager under random workloads, driven by a fake model.

The fake model's next token is a fixed function of (request, position), so
the exact tokens every request must produce are known in advance. The fake KV
cache stores, in each slot, a key of the whole prefix a token's KV depends on;
every step checks that each sequence reads back exactly its own prefix, which
catches a wrong block table, a block reused while still in use, or a wrongly
shared prefix block.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rdnac.runtime.block_manager import BlockManager, blocks_for
from rdnac.runtime.scheduler import Scheduler, Sequence, SequenceStatus

VOCAB = 50
EOS = 0


def model_token(request: int, position: int) -> int:
    """The fake model: a deterministic next token for `request` at `position`."""
    x = (request * 1_000_003 + position * 7_919 + 12_345) * 2_654_435_761 % 2**32
    return (x >> 11) % VOCAB


@dataclass
class Request:
    index: int
    arrival: int  # step at which it is added
    prompt: list[int]
    max_tokens: int
    abort_at: int | None = None  # step at which it is aborted, if still unfinished

    def expected(self) -> list[int]:
        out = []
        while len(out) < self.max_tokens:
            out.append(model_token(self.index, len(self.prompt) + len(out)))
            if out[-1] == EOS:
                break
        return out


@dataclass
class Run:
    streamed: dict[int, list[int]] = field(default_factory=dict)
    aborted: set[int] = field(default_factory=set)
    num_steps: int = 0
    num_preemptions: int = 0
    num_cache_hit_tokens: int = 0


def drive(requests: list[Request], num_blocks: int, block_size: int, max_num_seqs: int,
          max_num_batched_tokens: int, enable_prefix_caching: bool) -> Run:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens)
    kv: dict[int, int] = {}  # slot -> prefix key of the token whose KV it holds
    keys: dict[int, list[int]] = {}  # request -> prefix key at every position
    seqs: dict[int, Sequence] = {}
    run = Run()

    def extend_keys(r: int) -> None:
        ids, k = seqs[r].token_ids, keys[r]
        while len(k) < len(ids):
            k.append(hash((k[-1] if k else None, ids[len(k)])))

    def slot(seq: Sequence, p: int) -> int:
        return seq.block_table[p // block_size] * block_size + p % block_size

    for step in range(10_000):
        for r in requests:
            if r.arrival == step:
                seqs[r.index] = Sequence(str(r.index), list(r.prompt))
                keys[r.index] = []
                run.streamed[r.index] = []
                extend_keys(r.index)
                sched.add(seqs[r.index])
            if r.abort_at == step and r.index in seqs and seqs[r.index].status != SequenceStatus.FINISHED:
                sched.finish(seqs[r.index])
                run.aborted.add(r.index)
        if step > max(r.arrival for r in requests) and not sched.has_unfinished():
            break
        chunks = sched.schedule()
        run.num_steps += bool(chunks)

        # Budgets: all-decode within max_num_seqs, or a prefill step within the token budget.
        sizes = [c.end - c.start for c in chunks]
        assert len(sched.running) <= max_num_seqs and len(chunks) <= max_num_seqs
        assert all(s == 1 for s in sizes) or sum(sizes) <= max_num_batched_tokens, sizes
        assert len({id(c.seq) for c in chunks}) == len(chunks)
        # Block accounting: ref counts are exactly the running tables' references.
        refs = [0] * num_blocks
        for seq in sched.running:
            assert len(seq.block_table) >= blocks_for(seq.num_computed_tokens, block_size)
            for b in seq.block_table:
                refs[b] += 1
        assert refs == bm.ref_counts
        assert bm.num_free_blocks == refs.count(0)
        if not enable_prefix_caching:
            assert max(refs) <= 1

        for c in chunks:  # the fake forward pass: write this chunk's KV, read the whole prefix back
            seq, r = c.seq, int(c.seq.seq_id)
            assert c.start == seq.num_computed_tokens and c.start < c.end <= seq.num_tokens
            assert len(seq.block_table) >= blocks_for(c.end, block_size)
            for p in range(c.start, c.end):
                kv[slot(seq, p)] = keys[r][p]
        for c in chunks:
            assert [kv.get(slot(c.seq, p)) for p in range(c.end)] == keys[int(c.seq.seq_id)][:c.end]
        sched.update(chunks)

        for c in chunks:
            if not c.is_last:
                continue
            seq, r = c.seq, int(c.seq.seq_id)
            token = model_token(r, seq.num_tokens)
            seq.token_ids.append(token)
            extend_keys(r)
            run.streamed[r].append(token)
            if token == EOS or len(seq.output_ids) >= requests[r].max_tokens:
                sched.finish(seq)
    else:
        raise AssertionError("the workload did not finish")

    run.num_preemptions = sched.num_preemptions
    run.num_cache_hit_tokens = bm.num_cache_hit_tokens
    assert bm.num_free_blocks == num_blocks and not any(bm.ref_counts)
    for r in requests:
        assert seqs[r.index].status == SequenceStatus.FINISHED
        expected = r.expected()
        if r.index in run.aborted:
            assert run.streamed[r.index] == expected[:len(run.streamed[r.index])]
        else:
            assert run.streamed[r.index] == expected, r.index
        assert seqs[r.index].output_ids == run.streamed[r.index]
    return run


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    num_blocks = draw(st.integers(2, 24))
    capacity = num_blocks * block_size  # KV slots in the pool
    shared = [draw(st.integers(1, VOCAB - 1)) for _ in range(24)]  # a common prefix some prompts start with
    requests = []
    for index in range(draw(st.integers(1, 10))):
        prompt_len = draw(st.integers(1, min(40, capacity)))
        num_shared = draw(st.integers(0, min(prompt_len, len(shared))))
        prompt = shared[:num_shared] + [draw(st.integers(1, VOCAB - 1)) for _ in range(prompt_len - num_shared)]
        # A request whose prompt + max_tokens - 1 tokens cannot fit the pool is refused at add time.
        max_tokens = draw(st.integers(1, min(30, capacity - prompt_len + 1)))
        abort_at = draw(st.none() | st.integers(0, 40))
        requests.append(Request(index, draw(st.integers(0, 15)), prompt, max_tokens, abort_at))
    config = dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=draw(st.integers(1, 8)),
                  max_num_batched_tokens=draw(st.integers(1, 48)), enable_prefix_caching=draw(st.booleans()))
    return requests, config


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_with_exact_tokens(workload):
    requests, config = workload
    run = drive(requests, **config)
    event(f"preempted: {run.num_preemptions > 0}")


def test_small_pool_queues_and_preempts():
    rng = random.Random(0)
    requests = [Request(i, rng.randrange(4), [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))],
                        rng.randrange(8, 24)) for i in range(12)]
    run = drive(requests, num_blocks=10, block_size=4, max_num_seqs=6, max_num_batched_tokens=16,
                enable_prefix_caching=False)
    assert run.num_preemptions > 0


def test_prefix_caching_under_preemption():
    shared = list(range(1, 26))
    requests = [Request(i, i, shared + [30 + i] * i, 24) for i in range(6)]
    run = drive(requests, num_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=32,
                enable_prefix_caching=True)
    assert run.num_preemptions > 0 and run.num_cache_hit_tokens > 0


def test_block_manager_prefix_sharing():
    prompt = list(range(10, 30))  # 20 tokens: 5 blocks of 4
    for enable in (False, True):
        bm = BlockManager(16, 4, enable_prefix_caching=enable)
        a, cached = bm.allocate(prompt)
        assert cached == 0 and len(a) == 5
        bm.cache_full_blocks(a, prompt, 20)
        b, cached = bm.allocate(prompt[:14] + [99, 98])  # shares 3 full blocks with a
        assert cached == (12 if enable else 0)
        assert (b[:3] == a[:3]) == enable and len(b) == 4
        # A prompt equal to a cached one still computes its last token: the block holding it is not shared.
        c, cached = bm.allocate(prompt)
        assert cached == (16 if enable else 0) and c[4] != a[4]
        assert bm.num_free_blocks == 16 - 5 - (1 if enable else 4) - (1 if enable else 5)
        for table in (a, b, c):
            bm.free(table)
        assert bm.num_free_blocks == 16
        d, cached = bm.allocate(prompt)  # freed blocks stay cached until reused
        assert cached == (16 if enable else 0)
        bm.free(d)
        # Pressure evicts cached blocks: a pool-sized allocation succeeds and nothing is shared.
        assert bm.can_allocate(list(range(100, 164)))
        e, cached = bm.allocate(list(range(100, 164)))
        assert cached == 0 and sorted(e) == list(range(16)) and bm.num_free_blocks == 0
        assert not bm.can_allocate([1]) and not bm.can_append(e, 65)
        bm.free(e)
        assert bm.num_free_blocks == 16 and not any(bm.ref_counts)
