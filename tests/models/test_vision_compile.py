"""``model.vision.compile``: the towers' feature computation under ``torch.compile``, against the eager tower
with the same weights.

Most checks compile with ``backend="aot_eager"`` (dynamo's graph capture and AOT autograd's forward/backward
split, no code generation): the parts that can break a tower, at 10 to 20 seconds a test on a 2-core CPU. The
``slow`` test takes the production path (the config flag, inductor, which generates C++ kernels and builds
them with the system compiler: about 2 minutes cold on 2 cores, seconds once inductor's cache in ``/tmp``
is warm).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fvl.models import build_model
from fvl.models.vision import build_vision_tower
from tests.fixtures import tiny_cfg, tower_cfg

# Same weights, same input: a compiled graph may reorder and fuse float32 arithmetic, nothing more. Measured
# here: aot_eager is bit-exact; inductor differs by at most ~2e-6 on features of unit scale.
FEATURE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-3, "atol": 1e-5}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo caches compiled code per ``forward`` code object, shared by
    all instances of a class, so one test's graphs would otherwise serve (or crowd out) the next's."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tower_pair(cfg, backend: str | None = None):
    """An eager tower and a compiled one with the same weights. ``cfg`` builds the compiled one: with
    ``compile=true`` through the config flag (inductor), else compiled here with ``backend``."""
    torch.manual_seed(0)
    compiled = build_vision_tower(cfg)[0]
    if backend is not None:
        compiled.compile(backend=backend)
    assert compiled.compiled
    cfg.compile = False
    eager = build_vision_tower(cfg)[0]
    assert not eager.compiled
    eager.load_state_dict(compiled.state_dict())
    return eager, compiled


def pixels(tower, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, tower.image_size, tower.image_size)


def check_frozen(eager, compiled) -> None:
    """Frozen (no grad, eval): compiled features equal eager ones, and a second call with the same shapes
    runs the graphs already compiled (``fail_on_recompile`` raises if it would compile again)."""
    for tower in (eager, compiled):
        tower.eval().requires_grad_(False)
    px = pixels(eager)
    with torch.no_grad():
        want = eager.features(px)
        got = compiled.features(px)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1, "nothing was compiled"
        with torch.compiler.set_stance("fail_on_recompile"):
            again = compiled.features(pixels(eager))
    assert counters["stats"]["unique_graphs"] == graphs
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FEATURE_TOL)
        torch.testing.assert_close(again[name], got[name], rtol=0, atol=0)


def check_training(eager, compiled) -> None:
    """Training (grad on): every tower parameter gets a gradient through the compiled graph, equal to the
    eager tower's."""
    for tower in (eager, compiled):
        tower.train().requires_grad_(True)
        tower.zero_grad(set_to_none=True)
    px = pixels(eager)
    for tower in (eager, compiled):
        # A loss that weighs every feature and token differently, so a wrong gradient cannot cancel out.
        feats = tower.features(px)
        sum(((f * torch.linspace(-1, 1, f.shape[-1])) ** 2).mean() for f in feats.values()).backward()
    want = {n: p.grad for n, p in eager.named_parameters()}
    got = {n: p.grad for n, p in compiled.named_parameters()}
    assert all(g is not None for g in want.values())  # the premise: every parameter is on the path
    assert [n for n, g in got.items() if g is None] == []
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.integration  # torch.compile (aot_eager): seconds each
def test_florence2_compiled_features_equal_eager_and_compile_once():
    check_frozen(*tower_pair(tiny_cfg().vision, "aot_eager"))


@pytest.mark.integration  # torch.compile (aot_eager): seconds each
def test_florence2_compiled_tower_trains():
    check_training(*tower_pair(tiny_cfg().vision, "aot_eager"))


@pytest.mark.integration  # torch.compile (aot_eager): seconds each
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_vit_compiled_features_equal_eager_and_train(tower):
    eager, compiled = tower_pair(tower_cfg(tower).vision, "aot_eager")
    check_frozen(eager, compiled)
    for t in (eager, compiled):
        t.requires_grad_(True)
        # post_layernorm and the pooling head never reach the hidden states: no gradient, in either mode
        for name in t.unused_parameters(t.feature_names):
            t.get_parameter(name).requires_grad_(False)
    eager.train().zero_grad(set_to_none=True)
    compiled.train().zero_grad(set_to_none=True)
    px = pixels(eager)
    for t in (eager, compiled):
        sum(f.square().mean() for f in t.features(px).values()).backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        if p.requires_grad:
            assert q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, **GRAD_TOL)


def test_compile_keeps_state_dict_keys_and_classes():
    """Compiling in place (``nn.Module.compile``) leaves the model's state-dict keys, and so its checkpoints,
    as they are: no ``_orig_mod.``; a checkpoint of either loads into the other."""
    torch.manual_seed(0)
    eager = build_model(tiny_cfg())
    compiled = build_model(tiny_cfg("vision.compile=true"))
    assert compiled.vision.compiled and not eager.vision.compiled
    assert all(unit._compiled_call_impl is not None for unit in compiled.vision.compile_units())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    compiled.load_state_dict(eager.state_dict())
    # FSDP and activation checkpointing find the tower's blocks by class: still there
    classes = tuple(compiled.vision.wrap_classes())
    assert sum(isinstance(m, classes) for m in compiled.modules()) == sum(
        isinstance(m, classes) for m in eager.modules()
    )


@pytest.mark.inductor  # opt-in: a cold inductor build takes minutes on 2 cores (make compile-check)
def test_config_flag_compiles_with_inductor():
    """The production path: ``model.vision.compile=true`` builds the tower compiled with inductor, frozen
    as stage 2 runs it. (Inductor's backward is left to the aot_eager tests above: building its C++ kernels
    too took 5.4 minutes cold here, against 2 for the forward alone.)"""
    check_frozen(*tower_pair(tiny_cfg("vision.compile=true").vision))
