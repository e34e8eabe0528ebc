"""``model.llm.kernels``: liger's kernels are asked for exactly as named (its loss patch off), and where they
cannot run the error says why. Their equivalence with the eager layers is checked on the GPU
(``fvl.bench.gpu_round2 --check-kernels``): Triton has no CPU path."""

import sys
import types

import pytest

from fvl.config import load
from fvl.models import build_model
from fvl.models.kernels import KernelsUnavailable, apply_kernels


def test_unknown_kernels_are_config_errors():
    with pytest.raises(Exception, match="unknown \\['layernorm'\\]"):
        load("tiny", ["model.llm.kernels=[layernorm]"])


def test_no_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    llm = build_model(load("tiny").model).llm
    with pytest.raises(KernelsUnavailable, match="no CUDA device"):
        apply_kernels(llm, ["rms_norm"])
    assert apply_kernels(llm, []) == []


def test_the_kernels_named_are_applied_and_the_loss_is_left_to_fvl(monkeypatch):
    calls = []
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"phi3": None}
    fake._apply_liger_kernel_to_instance = lambda **kw: calls.append(kw)
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    llm = build_model(load("tiny").model).llm
    assert apply_kernels(llm, ["rms_norm", "rope"]) == ["rms_norm", "rope"]
    (call,) = calls
    assert call["model"] is llm and call["rms_norm"] and call["rope"] and not call["swiglu"]
    assert call["fused_linear_cross_entropy"] is False and call["cross_entropy"] is False
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {}
    with pytest.raises(KernelsUnavailable, match="no kernels for model_type='phi3'"):
        apply_kernels(llm, ["swiglu"])
