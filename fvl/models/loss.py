"""The causal-LM loss without the full-vocabulary logits (``model.llm.loss``).

transformers' ``*ForCausalLM.forward`` computes logits for every position, ``[B, T, V]``, and upcasts them to
float32 for the cross-entropy: at batch 8 x 2k tokens x Llama 3's 128K vocabulary that is 8 GB before the
backward doubles it. Images and prompts are never supervised, so most of those logits are wasted. Here the
LLM's base model gives the final hidden states, the positions with a target are selected first, and the
output head plus cross-entropy run on them only:

- ``chunked``: in chunks of tokens, each under activation checkpointing, so neither the forward nor the
  backward holds more than one chunk's logits (``CHUNK_LOGITS`` elements);
- ``fused``: liger-kernel's fused linear cross-entropy (GPU, the ``fvl[gpu-kernels]`` extra), which never
  writes the logits to memory at all.

Both give the loss transformers gives (mean over supervised tokens, labels shifted by one, ``-100``
ignored) and the same gradients; the returned output has ``.loss`` and ``logits=None``.

Logit transforms: Llama and Phi-3 apply none (``lm_head(h)`` is the logit). The ones transformers' causal
LMs apply after the head are reproduced (``LogitTransform``): Gemma 2/3's ``final_logit_softcapping``,
Cohere's ``logit_scale`` and Granite's ``logits_scaling``. An architecture with another transform would need
``full``. The head is called as a module (chunked), so its bias, a LoRA adapter on it or a quantised head
are all respected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from fvl.config.model import LOSS_MODES

IGNORE_INDEX = -100
# Logit elements in one chunk (and the size above which ``auto`` stops materialising all of them):
# 2**26 is 256 MiB in float32, i.e. 512 tokens at Llama 3's 128K vocabulary, 2048 at Phi-3.5's 32K.
# Big enough that each chunk's matmul is still large and efficient, small next to the LLM's activations.
CHUNK_LOGITS = 2**26
FUSED_EXTRA = "fvl[gpu-kernels]"


class FusedKernelMissing(ImportError):
    """``model.llm.loss=fused`` without liger-kernel installed."""


# ---- choosing the mode -------------------------------------------------------------------------------------
def fused_kernel_available() -> bool:
    """Whether liger-kernel's fused linear cross-entropy imports (it needs triton, so a GPU install)."""
    try:
        _fused_loss_class()
    except FusedKernelMissing:
        return False
    return True


def resolve_loss_mode(mode: str, device: torch.device, num_logits: int, plain_head: bool = True) -> str:
    """The mode to run. ``auto`` becomes ``fused`` when the kernel imports, ``device`` is CUDA and the
    output head is a plain ``nn.Linear`` (``plain_head``), else ``chunked`` when the full logits
    (``num_logits`` = batch x sequence x vocabulary) would exceed one chunk (``CHUNK_LOGITS``), else
    ``full``. An explicit ``fused`` without the kernel or off CUDA is an error, not a fallback."""
    if mode not in LOSS_MODES:
        raise ValueError(f"model.llm.loss={mode!r}: expected one of {', '.join(LOSS_MODES)}")
    if mode == "fused":
        _fused_loss_class()  # raises FusedKernelMissing, naming the extra
        if device.type != "cuda":
            raise ValueError(
                f"model.llm.loss=fused runs on CUDA only (the batch is on {device}): use chunked"
            )
    if mode != "auto":
        return mode
    if device.type == "cuda" and plain_head and fused_kernel_available():
        return "fused"
    return "chunked" if num_logits > CHUNK_LOGITS else "full"


# ---- the LLM's parts ---------------------------------------------------------------------------------------
def unwrap_causal_lm(llm: nn.Module) -> PreTrainedModel:
    """The transformers causal LM under a peft wrapper (LoRA injects its layers in place, so the base
    model's modules already carry the adapters); a plain causal LM is returned as it is."""
    get_base = getattr(type(llm), "get_base_model", None)  # on the class: peft forwards unknown attributes
    return get_base(llm) if get_base is not None else llm


def _decoder_and_head(causal_lm: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    if decoder is causal_lm or head is None:
        raise ValueError(
            f"{type(causal_lm).__name__} has no separate base model and output head: use model.llm.loss=full"
        )
    return decoder, head


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM applies to ``lm_head(h)``: ``logits * scale``, then ``tanh(x / cap) * cap``."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(causal_lm: PreTrainedModel) -> LogitTransform:
    """The transform transformers applies after the head for this model (identity for Llama and Phi-3)."""
    config = causal_lm.config.get_text_config()
    scale = 1.0
    if getattr(causal_lm, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale = float(causal_lm.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    return LogitTransform(scale, getattr(config, "final_logit_softcapping", None))  # Gemma 2/3


def _vocab_size(causal_lm: PreTrainedModel) -> int:
    return causal_lm.config.get_text_config().vocab_size


# ---- the loss ----------------------------------------------------------------------------------------------
def supervised_targets(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, H]`` hidden states and ``[B, T]`` labels -> ``([N, H], [N])``: the positions whose next
    token is supervised and that token, as transformers shifts them (position t predicts label t+1; the
    last position predicts nothing)."""
    shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index).to(hidden.device)
    keep = shifted != ignore_index
    # Boolean indexing waits for the device once (for N); it pays for itself: prompts and image tokens,
    # usually most of a multimodal batch, never reach the output head.
    return hidden[keep], shifted[keep]


def _chunk_loss_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, transform: LogitTransform
) -> torch.Tensor:
    # float32 for the softmax, as transformers' loss upcasts (the head itself runs in the model's or
    # autocast's dtype); the transform is applied in float32 too (identical in float32 runs).
    logits = transform(head(hidden).float())
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    transform: LogitTransform = LogitTransform(),
    chunk_tokens: int | None = None,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (``[N, H]``, ``[N]``, all supervised), or
    their sum divided by ``num_items`` when given (a step's supervised tokens over all its micro batches),
    ``chunk_tokens`` rows at a time (default: ``CHUNK_LOGITS // vocabulary``). Each chunk runs under
    activation checkpointing: its logits are freed after its loss and recomputed, one chunk at a time, in
    the backward."""
    vocab = _out_features(head)
    size = chunk_tokens or max(1, CHUNK_LOGITS // vocab)
    grad = torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(size), targets.split(size), strict=True):
        if grad:
            total = total + checkpoint(_chunk_loss_sum, h, y, head, transform, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, y, head, transform)
    return total / (targets.numel() if num_items is None else num_items)


def _out_features(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ValueError(f"output head {type(head).__name__} has no weight: use model.llm.loss=full")
    # A bitsandbytes 4-bit weight is packed; its logical shape is on the module.
    return int(getattr(head, "out_features", None) or weight.shape[0])


def is_plain_linear(head: nn.Module) -> bool:
    # Exact type: a bitsandbytes 4-bit head subclasses nn.Linear but stores a packed weight.
    return type(head) is nn.Linear


def _fused_loss_class() -> type[nn.Module]:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:  # liger-kernel missing, or its triton dependency
        raise FusedKernelMissing(
            f"model.llm.loss=fused needs liger-kernel (a GPU install with triton): pip install '{FUSED_EXTRA}', "
            f"or use model.llm.loss=chunked ({e})"
        ) from e
    return LigerFusedLinearCrossEntropyLoss


def fused_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    transform: LogitTransform = LogitTransform(),
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy (the sum over ``num_items`` when given) with liger-kernel's fused linear cross-entropy (its Triton kernels run on CUDA
    only): the kernel reads the head's weight and bias directly, so the head must be a plain ``nn.Linear``
    (no LoRA on it, not quantised; ``chunked`` handles those) whose weight is materialised here (not a
    DeepSpeed ZeRO-3 partition; FSDP2 unshards the root's parameters for its forward)."""
    loss_cls = _fused_loss_class()
    if not is_plain_linear(head):
        raise ValueError(
            f"model.llm.loss=fused needs a plain nn.Linear output head, got {type(head).__name__}: use chunked"
        )
    if head.weight.shape != (head.out_features, head.in_features):
        raise ValueError(
            f"model.llm.loss=fused: the output head's weight is {tuple(head.weight.shape)} (sharded?)"
        )
    bias = head.bias
    if transform.scale != 1.0:  # (h W^T + b) s == (s h) W^T + s b
        hidden = hidden * transform.scale
        bias = None if bias is None else bias * transform.scale
    reduction = "mean" if num_items is None else "sum"
    loss_fn = loss_cls(ignore_index=IGNORE_INDEX, reduction=reduction, softcap=transform.softcap)
    loss = loss_fn(head.weight, hidden, targets, bias)
    return loss if num_items is None else loss / num_items


def causal_lm_loss(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    mode: str = "auto",
    chunk_tokens: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> CausalLMOutputWithPast:
    """The LLM's training output for ``inputs_embeds``: what ``llm(..., labels=labels, use_cache=False)``
    returns with ``full`` (and whenever ``labels`` is None), else ``.loss`` computed without the full
    logits (``.logits`` is None). ``llm`` is a transformers causal LM, possibly peft-wrapped; ``mode`` is
    resolved by ``resolve_loss_mode``; ``chunk_tokens`` overrides ``chunked``'s chunk size.
    ``num_items_in_batch``: the loss is the sum over this batch's supervised tokens divided by it (the
    count of a whole optimizer step, as transformers' Trainer passes it), not their mean: a micro batch
    without supervised tokens then adds 0 instead of NaN."""
    # No KV cache in a training forward: transformers would otherwise build one from ``config.use_cache``,
    # and with a cache it skips detecting packed rows from ``position_ids`` (no attention mask), so packed
    # samples would attend to each other under SDPA / eager attention.
    extra: dict[str, object] = {"use_cache": False}
    if position_ids is not None:
        extra["position_ids"] = position_ids
    B, T = inputs_embeds.shape[:2]
    if labels is None:
        return llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra)
    causal_lm = unwrap_causal_lm(llm)
    head = causal_lm.get_output_embeddings()
    mode = resolve_loss_mode(
        mode, inputs_embeds.device, B * T * _vocab_size(causal_lm), is_plain_linear(head)
    )
    if num_items_in_batch is not None and mode == "full":
        extra["num_items_in_batch"] = num_items_in_batch
    if mode == "full":
        return llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **extra)
    decoder, head = _decoder_and_head(causal_lm)
    out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra)
    hidden, targets = supervised_targets(out.last_hidden_state, labels)
    transform = logit_transform(causal_lm)
    if targets.numel() == 0:
        # transformers' mean over no tokens is NaN (keep that, with a graph so backward still runs); a sum
        # over a step's count adds nothing.
        loss = hidden.sum().float() * (math.nan if num_items_in_batch is None else 0.0)
    elif mode == "fused":
        loss = fused_cross_entropy(hidden, targets, head, transform, num_items_in_batch)
    else:
        loss = chunked_cross_entropy(hidden, targets, head, transform, chunk_tokens, num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=None)
