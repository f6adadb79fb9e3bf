"""``benchmarks/attention.py``'s protocol: batches sized by the clock, implementations interleaved,
failures kept in their row, and FLOPs counted on the pairs the mask makes visible."""

import dataclasses

import numpy as np
import pytest

from megacontext_jax.kernels.mask import visible
from megacontext_jax.kernels.tiles import (
    FULL,
    PARTIAL,
    key_tile_bounds,
    query_tile_bounds,
    tile_kinds,
)
from tests.conftest import benchmark_script

attention = benchmark_script("attention")


class FakeClock:
    """A clock that moves only when a timed function runs: ``cost`` seconds per call."""

    def __init__(self):
        self.now, self.log = 0.0, []

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, cost: float):
        def fn(x):
            self.now += cost
            self.log.append(name)
            return x

        return fn


def _jit_free(monkeypatch):
    """``time_interleaved`` compiles with jax.jit; here the functions are plain Python."""

    class Compiled:
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args):
            return self

        def compile(self):
            return self.fn

    monkeypatch.setattr(attention.jax, "jit", Compiled)


def test_batches_last_the_minimum_and_implementations_interleave(monkeypatch):
    _jit_free(monkeypatch)
    clock = FakeClock()
    fns = {"fast": (clock.work("fast", 0.001), (1,)), "slow": (clock.work("slow", 0.05), (1,))}
    protocol = attention.Protocol(warmups=3, repeats=7, min_batch_s=0.02)
    timings = attention.time_interleaved(fns, protocol, clock=clock)
    fast, slow = timings["fast"], timings["slow"]
    # The fast function is batched until a batch lasts 20 ms; the slow one runs alone.
    assert fast.calls * 0.001 >= 0.02 and slow.calls == 1
    assert len(fast.per_call_s) == len(slow.per_call_s) == 7
    assert fast.median_s == pytest.approx(0.001) and slow.min_s == pytest.approx(0.05)
    # After warm-up and sizing, the timed batches alternate: fast x calls, slow, fast x calls, ...
    timed = clock.log[-7 * (fast.calls + 1) :]
    assert timed == (["fast"] * fast.calls + ["slow"]) * 7
    assert clock.log[:3] == ["fast"] * 3  # the warm-ups come first


def test_a_failing_implementation_is_reported_and_the_rest_are_timed(monkeypatch):
    _jit_free(monkeypatch)
    clock = FakeClock()

    def broken(x):
        raise RuntimeError("no cuDNN here\nmore detail")

    fns = {"broken": (broken, (1,)), "ok": (clock.work("ok", 0.03), (1,))}
    timings = attention.time_interleaved(fns, attention.Protocol(repeats=2), clock=clock)
    assert timings["broken"] == "failed: RuntimeError: no cuDNN here"
    assert len(timings["ok"].per_call_s) == 2
    row = attention._rates(timings, flops=3e12, prefix="fwd")
    assert row["broken_fwd_error"] == timings["broken"]
    assert row["ok_fwd_tflops"] == pytest.approx(100.0)


def test_flops_count_visible_pairs_and_padding_sees_nothing():
    shapes = attention.SMOKE
    meta, spec = attention.pyramid_meta(256, shapes), attention.pyramid_spec(shapes)
    # 256 tokens, 32 LOD1 and 4 LOD2 gists, padded with entries that end at -1.
    assert meta.lod.shape == (1, 384)
    assert np.all(np.asarray(meta.end)[0, 292:] == -1)
    mask = np.asarray(visible(meta.end, meta.lod, meta.start, meta.end, meta.valid, spec))
    assert not mask[0, 292:].any() and not mask[0, :, 292:].any()
    assert attention.visible_pairs(meta, spec) == mask.sum()
    assert attention.causal_pairs(4) == 10
    assert attention.attention_flops(10, 8, 2) == 4 * 10 * 8 * 2


def test_tile_visits_are_the_pass_lists_kinds():
    blocks = attention.BlockSizes(block_q=32, block_k=64, block_q_bwd=64, block_k_bwd=32)
    shapes = dataclasses.replace(attention.SMOKE, blocks=blocks)
    meta, spec = attention.pyramid_meta(256, shapes), attention.pyramid_spec(shapes)
    visits = attention.tile_visits(meta, spec, blocks)

    def kinds(bq, bk):
        return np.asarray(
            tile_kinds(query_tile_bounds(meta.end, bq), key_tile_bounds(meta, bk), spec)
        )

    for name, bq, bk in (("fwd", 32, 64), ("dq", 64, 32), ("dkdv", 64, 32)):
        # dk/dv walks the transpose of dq's kinds: the same tile pairs, from the key side.
        assert visits[f"{name}_tiles_partial"] == (kinds(bq, bk) == PARTIAL).sum() > 0
        assert visits[f"{name}_tiles_full"] == (kinds(bq, bk) == FULL).sum()


def test_without_a_gpu_the_timed_part_says_so(capsys):
    attention.main([])
    out = capsys.readouterr().out
    assert "no GPU (backend 'cpu'): nothing to time (--smoke runs anyway)" in out


def test_the_decode_rows_time_every_implementation():
    shapes = dataclasses.replace(attention.SMOKE, decode_lengths=(96,))
    protocol = attention.Protocol(warmups=0, repeats=1, min_batch_s=0.0)
    (row,) = attention.decode_table(shapes, protocol)
    assert not [key for key in row if key.endswith("_error")]
    assert {"split_kv_GBps", "mixed_GBps", "xla_GBps"} <= row.keys()
