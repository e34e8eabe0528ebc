"""``model.llm.loss``: the chunked (and fused) loss equals transformers' full-logits loss, in value and in
gradients, through images, text-only rows, padding, LoRA and logit transforms, without ever allocating the
full logits; ``fused`` without its kernel fails clearly; ``auto`` picks as documented."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM

import fvl.models.loss as L
from fvl.inputs.collate import Sample, collate
from fvl.models import build_model
from fvl.text.templates import IGNORE_INDEX
from tests.fixtures import TINY_LLAMA, tiny_cfg

# float32 on CPU: the chunked sums are the same numbers as one big cross-entropy, reduced in another order.
RTOL = 1e-5
CHUNK = 4  # tokens per chunk in the equality tests: the batches below have 4-10 chunks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def small_chunks(monkeypatch: pytest.MonkeyPatch, vocab: int) -> None:
    monkeypatch.setattr(L, "CHUNK_LOGITS", CHUNK * vocab)


# ---- FlorenceVL end to end ---------------------------------------------------------------------------------
def mixed_batch(model) -> dict:
    """Two image rows (one with two images), a text-only row, right padding, -100 on prompts and images."""

    def sample(question: str, answer: str, n_images: int) -> Sample:
        conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        t = model.template.tokenize(conv, model.tokenizer, model.num_image_tokens, num_images=n_images)
        images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(n_images)]
        return Sample(t.input_ids, t.labels, images)

    samples = [
        sample("<image>\nWhat colour is it?", "A red square on a blue background, slightly rotated.", 1),
        sample("Tell me a word.", "cat", 0),
        sample("<image>\n<image>\nSame shape?", "no", 2),
    ]
    batch = collate(samples, model.tokenizer.pad_token_id)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == IGNORE_INDEX).any()
    assert supervised > 3 * CHUNK, "the batch must span several chunks"
    return batch


def loss_and_grads(model, batch: dict, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    model.cfg.llm.loss = mode
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out


@pytest.fixture(scope="module", params=["phi3", "llama"])
def full_vs_chunked(request):
    """``(model, full run, chunked run)`` on one mixed batch, for the tiny Phi-3 preset and TINY_LLAMA."""
    torch.manual_seed(0)
    cfg = tiny_cfg() if request.param == "phi3" else tiny_cfg(llm_arch=dict(TINY_LLAMA))
    model = build_model(cfg).train()
    batch = mixed_batch(model)
    with pytest.MonkeyPatch.context() as mp:
        small_chunks(mp, model.llm.config.vocab_size)
        return model, loss_and_grads(model, batch, "full"), loss_and_grads(model, batch, "chunked")


def test_chunked_loss_equals_full_loss(full_vs_chunked):
    model, (full, _, full_out), (chunked, _, chunked_out) = full_vs_chunked
    assert model.llm.config.model_type in ("phi3", "llama")
    assert full_out.logits is not None and chunked_out.logits is None
    assert torch.isfinite(full)
    assert rel_err(chunked, full) < RTOL, (chunked.item(), full.item())


def test_chunked_gradients_equal_full_gradients(full_vs_chunked):
    model, (_, full, _), (_, chunked, _) = full_vs_chunked
    assert full.keys() == chunked.keys()
    names = [n for n in full if n.startswith("projector.")]
    names += [
        "llm.model.layers.0.mlp.down_proj.weight",
        "llm.model.embed_tokens.weight",
        "llm.lm_head.weight",
    ]
    for name in names:
        assert full[name].norm() > 0, name
        assert rel_err(chunked[name], full[name]) < RTOL, name


def test_lora_wrapped_llm_chunked_equals_full(monkeypatch):
    from fvl.config.train import LoraConfig
    from fvl.train.adapters import apply_lora

    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    apply_lora(model, LoraConfig(r=4, dropout=0.0))
    assert type(model.llm).__name__.startswith("Peft")
    # LoRA's B starts at zero (adapters off); random B makes a chunked path that skipped them disagree.
    for name, p in model.llm.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    model.train()
    batch = mixed_batch(model)
    small_chunks(monkeypatch, L.unwrap_causal_lm(model.llm).config.vocab_size)
    full, full_grads, _ = loss_and_grads(model, batch, "full")
    chunked, chunked_grads, out = loss_and_grads(model, batch, "chunked")
    assert out.logits is None
    assert rel_err(chunked, full) < RTOL, (chunked.item(), full.item())
    with torch.no_grad(), model.llm.disable_adapter():  # the adapters do change the loss
        assert rel_err(model(batch).loss, full) > 1e-3
    lora = [n for n in full_grads if "lora_B" in n]
    assert lora and all(rel_err(chunked_grads[n], full_grads[n]) < RTOL for n in lora)


# ---- bare causal LMs ---------------------------------------------------------------------------------------
def bare_llm(model_type: str, vocab: int, **arch) -> nn.Module:
    """A one-layer random causal LM of ``model_type`` in float32, with logits of order one (a wide init)
    so that soft-capping and scaling change the loss."""
    torch.manual_seed(0)
    dims = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    dims.update(num_hidden_layers=1, vocab_size=vocab, initializer_range=0.3)
    config = AutoConfig.for_model(model_type, **{**dims, **arch})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def lm_inputs(llm: nn.Module, T: int, supervised: slice, B: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = llm.config.vocab_size
    ids = torch.randint(0, vocab, (B, T))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, supervised] = ids[:, supervised]
    return llm.get_input_embeddings()(ids).detach(), labels


@pytest.mark.parametrize(
    ("model_type", "arch", "transform"),
    [
        ("gemma2", {"final_logit_softcapping": 0.1, "head_dim": 16}, L.LogitTransform(softcap=0.1)),
        ("granite", {"logits_scaling": 0.05}, L.LogitTransform(scale=20.0)),
        ("cohere", {"logit_scale": 10.0}, L.LogitTransform(scale=10.0)),
    ],
)
def test_logit_transforms_are_those_transformers_applies(monkeypatch, model_type, arch, transform):
    llm = bare_llm(model_type, 512, **arch)
    assert L.logit_transform(llm) == transform
    embeds, labels = lm_inputs(llm, 32, slice(8, 32))
    full = llm(inputs_embeds=embeds, labels=labels).loss
    small_chunks(monkeypatch, 512)
    chunked = L.causal_lm_loss(llm, embeds, None, labels, mode="chunked").loss
    assert rel_err(chunked, full) < RTOL
    # The transform matters here: the head alone gives another loss.
    hidden = llm.get_decoder()(inputs_embeds=embeds).last_hidden_state
    plain = L.chunked_cross_entropy(*L.supervised_targets(hidden, labels), llm.lm_head)
    assert rel_err(plain, full) > 1e-2


def test_packed_rows_equal_their_samples_run_apart(monkeypatch):
    # Packed batches (fvl.data.packing): no attention mask, position ids restarting at each sample, the
    # first token of each sample unsupervised. Both modes must keep the samples apart: transformers only
    # detects the packing without a KV cache, so the full path must not let it build one.
    llm = bare_llm("llama", 256)
    embeds, labels = lm_inputs(llm, 24, slice(4, 24), B=2)
    labels[:, 10] = IGNORE_INDEX
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    sums, count = 0.0, 0
    for part in (slice(0, 10), slice(10, 24)):
        n = int((labels[:, part][:, 1:] != IGNORE_INDEX).sum())
        sums, count = sums + llm(inputs_embeds=embeds[:, part], labels=labels[:, part]).loss * n, count + n
    apart = sums / count
    small_chunks(monkeypatch, 256)
    for mode in ("full", "chunked"):
        packed = L.causal_lm_loss(llm, embeds, None, labels, position_ids=positions, mode=mode).loss
        assert rel_err(packed, apart) < RTOL, mode


def test_no_supervised_token_gives_nan_like_transformers():
    llm = bare_llm("llama", 256)
    embeds, labels = lm_inputs(llm, 8, slice(0, 0))
    assert torch.isnan(llm(inputs_embeds=embeds, labels=labels).loss)
    loss = L.causal_lm_loss(llm, embeds, None, labels, mode="chunked").loss
    assert torch.isnan(loss) and loss.requires_grad


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (forward and backward), in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def peak_live_bytes(fn) -> int:
    """Peak of CPU tensor memory alive while ``fn`` runs, from the profiler's allocation timeline (each op's
    own allocations at its start, frees where they happen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (ev.time_range.start, ev.cpu_memory_usage if ev.name == "[memory]" else ev.self_cpu_memory_usage)
        for ev in prof.events()
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def test_chunked_never_allocates_the_full_logits(monkeypatch):
    vocab, T, chunk = 65536, 512, 32
    llm = bare_llm("llama", vocab, hidden_size=32, intermediate_size=64)
    embeds, labels = lm_inputs(llm, T, slice(T // 4, T))  # a quarter prompt, the rest supervised: 12 chunks
    logits_bytes, chunk_bytes = T * vocab * 4, chunk * vocab * 4
    monkeypatch.setattr(L, "CHUNK_LOGITS", chunk * vocab)

    def step(mode: str) -> None:
        L.causal_lm_loss(llm, embeds, None, labels, mode=mode).loss.backward()

    largest, peak = {}, {}
    for mode in ("full", "chunked"):
        with LargestTensor() as probe:
            step(mode)
        largest[mode] = probe.largest
        peak[mode] = peak_live_bytes(lambda mode=mode: step(mode))
    assert largest["full"] >= logits_bytes  # the probe sees the full logits (and their gradient)
    assert largest["chunked"] < logits_bytes / 4, largest
    # Checkpointing frees each chunk's logits: the backward holds one chunk at a time, not all twelve.
    assert peak["chunked"] < min(peak["full"] / 4, 6 * chunk_bytes), peak


# ---- fused and auto ----------------------------------------------------------------------------------------
def test_fused_without_the_kernel_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed: its import raises
    assert not L.fused_kernel_available()
    with pytest.raises(L.FusedKernelMissing, match=r"fvl\[gpu-kernels\]"):
        L.resolve_loss_mode("fused", torch.device("cuda"), 1)
    llm = bare_llm("llama", 256)
    embeds, labels = lm_inputs(llm, 8, slice(2, 8))
    with pytest.raises(L.FusedKernelMissing, match="liger-kernel"):
        L.causal_lm_loss(llm, embeds, None, labels, mode="fused")


def reference_liger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``liger_kernel`` with LigerFusedLinearCrossEntropyLoss's signature and maths in torch."""

    class LigerFusedLinearCrossEntropyLoss(nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean", softcap=None):
            super().__init__()
            self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap

        def forward(self, lin_weight, _input, target, bias=None):
            logits = nn.functional.linear(_input, lin_weight, bias).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return nn.functional.cross_entropy(
                logits, target, ignore_index=self.ignore_index, reduction=self.reduction
            )

    package, sub = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    sub.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    package.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)


@pytest.mark.parametrize(
    ("model_type", "arch"),
    [("gemma2", {"final_logit_softcapping": 0.1, "head_dim": 16}), ("cohere", {"logit_scale": 10.0})],
)
def test_fused_passes_the_head_and_transform_to_the_kernel(monkeypatch, model_type, arch):
    reference_liger(monkeypatch)
    llm = bare_llm(model_type, 512, **arch)
    embeds, labels = lm_inputs(llm, 32, slice(8, 32))
    full = llm(inputs_embeds=embeds, labels=labels).loss
    hidden = llm.get_decoder()(inputs_embeds=embeds).last_hidden_state
    fused = L.fused_cross_entropy(*L.supervised_targets(hidden, labels), llm.lm_head, L.logit_transform(llm))
    assert rel_err(fused, full) < RTOL
    # off CUDA an explicit fused is refused (the real kernels are Triton) rather than failing inside them
    with pytest.raises(ValueError, match="CUDA only"):
        L.causal_lm_loss(llm, embeds, None, labels, mode="fused")


def test_auto_resolves_as_documented(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big, small = L.CHUNK_LOGITS + 1, L.CHUNK_LOGITS
    monkeypatch.setattr(L, "fused_kernel_available", lambda: True)
    assert L.resolve_loss_mode("auto", cuda, small) == "fused"
    assert L.resolve_loss_mode("auto", cuda, big, plain_head=False) == "chunked"
    assert L.resolve_loss_mode("auto", cpu, big) == "chunked"
    assert L.resolve_loss_mode("auto", cpu, small) == "full"
    monkeypatch.setattr(L, "fused_kernel_available", lambda: False)
    assert L.resolve_loss_mode("auto", cuda, big) == "chunked"
    assert L.resolve_loss_mode("auto", cuda, small) == "full"
    assert L.resolve_loss_mode("chunked", cpu, small) == "chunked"
    assert L.resolve_loss_mode("full", cpu, big) == "full"
    with pytest.raises(ValueError, match="expected one of"):
        L.resolve_loss_mode("fast", cpu, small)


def test_auto_on_the_tiny_preset_keeps_the_logits(tiny_model):
    # The tiny model's batches are far below one chunk of logits: auto stays on transformers' path.
    assert tiny_model.cfg.llm.loss == "auto"
    batch = mixed_batch(tiny_model)
    with torch.no_grad():
        out = tiny_model(batch)
    assert out.logits is not None and out.logits.shape[-1] == tiny_model.llm.config.vocab_size


@pytest.mark.parametrize("mode", ["full", "chunked"])
def test_a_steps_token_count_turns_the_mean_into_that_share_of_the_step(mode, monkeypatch):
    """With ``num_items_in_batch`` (a whole step's supervised tokens) the loss is this micro batch's sum over
    that count, in every mode; a micro batch with nothing supervised adds 0 (its mean would be NaN)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    batch = mixed_batch(model)
    small_chunks(monkeypatch, model.llm.config.vocab_size)
    model.cfg.llm.loss = mode
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(batch).loss
        share = model({**batch, "num_items_in_batch": torch.tensor(4.0 * supervised)}).loss
        nothing = model(
            {**batch, "labels": torch.full_like(batch["labels"], -100), "num_items_in_batch": 7}
        ).loss
    assert rel_err(share, mean / 4) < RTOL
    assert torch.isnan(model({**batch, "labels": torch.full_like(batch["labels"], -100)}).loss)
    assert nothing.item() == 0.0


@pytest.mark.inductor  # flex attention compiles its block mask with inductor (a C++ build on a CPU)
def test_flex_attention_keeps_packed_samples_apart():
    """``model.llm.attn_implementation=flex_attention`` (a kernel that skips the blocks a packed row's document
    mask leaves out: issue 28's GPU packing runs) builds the same per-sample mask from the position ids.
    Forward only: flex attention has no backward on a CPU."""
    import warnings

    llm = bare_llm("llama", 256)
    embeds, labels = lm_inputs(llm, 24, slice(4, 24), B=2)
    labels[:, 10] = IGNORE_INDEX
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    with torch.no_grad():
        sdpa = L.causal_lm_loss(llm, embeds, None, labels, position_ids=positions, mode="full").loss
        llm.set_attn_implementation("flex_attention")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex attention uncompiled on a CPU: slow, and says so
            flex = L.causal_lm_loss(llm, embeds, None, labels, position_ids=positions, mode="full").loss
    assert rel_err(flex, sdpa) < 1e-4
