"""Two gloo processes with torch DDP and with FSDP2 (fvl's wrapping): a text-only micro batch on one rank and
images on the other still give every rank the same graph (a zero-weighted blank image), so backward, the
gradient all-reduce and FSDP's collectives work."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fvl.models import build_model, set_trainable
from tests.fixtures import free_port, stage_trainable, tiny_cfg
from tests.models.test_trainable import one_batch


def _batch(model, text_only: bool):
    batch = one_batch(model)
    if not text_only:
        return batch
    keep = batch["input_ids"].ne(model.image_token_id).all(dim=1)  # the text-only sample of one_batch
    return {k: v[keep] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def _worker(rank: int, world: int, port: int, out: str, sharded: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(tiny_cfg("vision.frozen_dtype=bfloat16", "llm.frozen_dtype=bfloat16"))
    set_trainable(model, stage_trainable("finetune" if sharded else "pretrain"))
    model.train()
    batch = _batch(model, text_only=rank == 1)
    assert ("pixel_values" in batch) == (rank == 0)
    if sharded:  # FSDP2 with fvl's units: mixed float32 / bf16 parameters in one unit
        from torch.distributed.device_mesh import init_device_mesh

        from fvl.train.strategy import local, shard_model

        wrapped = shard_model(model, init_device_mesh("cpu", (world,)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(batch).loss
        loss.backward()
        grads = {n: local(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: strict
        ddp(batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(grads, f"{out}/grads{rank}.pt")
    dist.destroy_process_group()


def _two_ranks(tmp_path, sharded: bool) -> tuple[dict, dict]:
    """Run ``_worker`` on two gloo processes (rank 1 text-only); each rank's gradients after backward."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), sharded), nprocs=2, join=True)
    return tuple(torch.load(tmp_path / f"grads{rank}.pt", weights_only=True) for rank in (0, 1))


@pytest.mark.e2e
def test_fsdp_with_a_text_only_rank(tmp_path):
    g0, g1 = _two_ranks(tmp_path, sharded=True)
    assert g0.keys() == g1.keys() and any(n.startswith("projector.") for n in g0)
    assert all(g.dtype == torch.float32 for g in g0.values())  # gradients of the float32 master weights
    assert any(g0[n].abs().sum() > 0 for n in g0 if n.startswith("projector."))  # rank 0's image signal


@pytest.mark.e2e
def test_ddp_with_a_text_only_rank(tmp_path):
    g0, g1 = _two_ranks(tmp_path, sharded=False)
    assert g0.keys() == g1.keys() and any(n.startswith("vision.") for n in g0)
    for name in g0:  # all-reduced: identical on both ranks, and the vision tower got rank 0's signal
        assert torch.equal(g0[name], g1[name]), name
    assert any(g0[n].abs().sum() > 0 for n in g0 if n.startswith("vision."))


def test_text_only_batch_in_training_reaches_every_trainable_parameter_with_zero():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    set_trainable(model, stage_trainable("pretrain"))
    model.train()
    batch = _batch(model, text_only=True)
    loss = model(batch).loss
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch).loss, loss.detach())  # the blank image changes nothing
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            if name.startswith(("vision.", "projector.")):
                assert not p.grad.any(), name
