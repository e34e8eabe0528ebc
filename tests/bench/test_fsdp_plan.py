"""The many-GPU step model: ring collectives' bytes, the micro batch the global batch leaves, overlap, and
what bf16 gathers, one reduce per step and hybrid sharding change."""

import pytest

from fvl.bench.fsdp_plan import LINKS, PEAK, Model, plan

# 1B trainable, 0.5B frozen; 1 TFLOP and 10 ms a sample
M = Model("m", trainable_b=1.0, frozen_b=0.5, flops_per_sample=1e12, compute_ms_per_sample=10.0)


def test_ring_bytes_per_rank_and_accumulation():
    p = plan(M, world=8, link="nvlink", global_batch=256, micro_batch=8)
    assert p.accumulation == 4
    # forward: 1e9 x 4 + 0.5e9 x 2 bytes; backward: the trainable 4e9 again; a ring moves 7/8 of it per rank
    assert p.gather_gb == pytest.approx(7 / 8 * (5 + 4))
    assert p.reduce_gb == pytest.approx(7 / 8 * 4 * 4)  # fp32 gradients, every micro batch
    assert p.comm_ms == pytest.approx(1e3 * (4 * p.gather_gb + p.reduce_gb) * 1e9 / LINKS["nvlink"])
    # compute-bound here: the step is the compute plus the exposed tenth of the communication
    assert p.compute_ms > p.comm_ms
    assert p.step_ms == pytest.approx(p.compute_ms + 0.1 * p.comm_ms)
    assert p.mfu == pytest.approx(32 * 1e12 / (p.step_ms / 1e3) / PEAK)


def test_bf16_gathers_one_reduce_per_step_and_hsdp_each_cut_the_communication():
    fp32 = plan(M, 64, "ib400", 512)
    bf16 = plan(M, 64, "ib400", 512, gather_bytes_trainable=2, sync_every_micro_batch=False)
    hsdp = plan(M, 64, "ib400", 512, gather_bytes_trainable=2, sync_every_micro_batch=False, hsdp_node=8)
    assert fp32.comm_ms > bf16.comm_ms > hsdp.comm_ms
    assert bf16.reduce_gb == pytest.approx(63 / 64 * 4)
    assert fp32.mfu < bf16.mfu < hsdp.mfu


def test_the_micro_batch_shrinks_to_what_the_global_batch_leaves_a_rank():
    assert plan(M, 64, "ib400", 256, micro_batch=8).accumulation == 1  # 4 samples a rank, one micro batch
    with pytest.raises(ValueError, match="does not split"):
        plan(M, 64, "ib400", 100)
