"""``FVL``: lmms-eval's ``lmms`` model class for fvl checkpoints (``--model fvl``).

``--model_args``: ``checkpoint`` (required: a safetensors checkpoint, a run folder, ``latest`` or an ``fvl
export`` folder), ``dtype`` (auto: bfloat16 on a GPU, float32 on the CPU; or bfloat16, float16, float32),
``max_new_tokens`` (answer length when a task sets none; default 1024, lmms-eval's llava's), ``runs`` (where
``latest`` looks). lmms-eval's own ``--batch_size`` (default 1, the paper's setting) and ``--device`` (default
auto: the GPU when there is one) apply. One process: lmms-eval's multi-process launch is refused.

Generation requests are answered as ``fvl eval`` answers (``fvl.eval.evaluate.generate_answers``), cut at the
task's ``until``; log-likelihood requests (multiple choice) get lmms-eval's ``(loss, is greedy)`` pairs
(``requests.continuation_loss``); multi-round requests are refused.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from fvl.config.eval import EvalConfig
from fvl.eval.evaluate import generate_answers
from fvl.integrations.lmms_eval.requests import (
    DEFAULT_MAX_NEW_TOKENS,
    batches,
    continuation_loss,
    cut_at_stops,
    generation,
    images_of,
    load_model,
)

MODEL_ARGS = ("checkpoint", "dtype", "max_new_tokens", "runs", "batch_size", "device")


class FVL(lmms):
    """An fvl checkpoint answering lmms-eval's generation requests greedily, as ``fvl eval`` does, and
    scoring the continuations of its log-likelihood (multiple-choice) requests."""

    is_simple = True

    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        runs: str = "runs",
        max_batch_size: int | None = None,  # lmms-eval passes it for its "auto" batch sizes, which fvl lacks
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"fvl: unknown model_args {sorted(unknown)}; known: {', '.join(MODEL_ARGS)}")
        if not checkpoint:
            raise ValueError(
                "fvl: pass --model_args checkpoint=PATH (a .safetensors checkpoint, a run folder, latest, "
                "or a folder written by fvl export)"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "fvl: the lmms-eval adapter runs in one process; launch lmms-eval without accelerate"
            )
        if not str(batch_size).isdigit() or int(batch_size) <= 0:
            raise ValueError(f"fvl: --batch_size {batch_size!r}: expected a positive integer (no 'auto')")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"fvl: max_new_tokens={max_new_tokens!r}: expected a positive integer")
        # EvalConfig checks and resolves device and dtype exactly as fvl eval does
        placement = EvalConfig(batch_size=int(batch_size), device=str(device or "auto"), dtype=str(dtype))
        self._device, self._dtype = placement.placement()
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = max_new_tokens
        self.checkpoint = str(checkpoint)
        self.model = load_model(checkpoint, runs).to(device=self._device, dtype=getattr(torch, self._dtype))

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return torch.device(self._device)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers to ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)`` requests,
        ``batch_size`` at a time in lmms-eval's order; each cut at its task's ``until`` strings."""
        args = [r.args for r in requests]
        settings = [generation(a[1], self.max_new_tokens) for a in args]
        answers = [""] * len(args)
        with tqdm(total=len(args), disable=self.rank != 0, desc="fvl answering") as bar:
            for batch in batches(settings, self.batch_size):
                images = [self._images(args[i]) for i in batch]
                prompts = [args[i][0] for i in batch]
                with torch.no_grad():
                    texts = generate_answers(self.model, images, prompts, settings[batch[0]].max_new_tokens)
                for i, text in zip(batch, texts, strict=True):
                    answers[i] = cut_at_stops(text, settings[i].until)
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), answers[i])
                bar.update(len(batch))
        return answers

    def _images(self, request_args: tuple) -> list[Any]:
        _, _, doc_to_visual, doc_id, task, split = request_args
        doc = self.task_dict[task][split][doc_id]
        return images_of(doc_to_visual(doc), f"task {task}, {split} doc {doc_id}")

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """``(mean negative log-likelihood per token, is greedy)`` of each ``(context, continuation,
        doc_to_visual, doc_id, task, split)`` request's continuation (a string, or the task's
        ``doc_to_target``), one request at a time: lmms-eval's own convention, whatever its base class's
        docstring says (its llava returns the loss, its multiple-choice scoring takes the smallest)."""
        out = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
            [r.args for r in requests], disable=self.rank != 0, desc="fvl scoring"
        ):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if not isinstance(continuation, str):
                raise ValueError(
                    f"task {task}, {split} doc {doc_id}: the continuation to score is "
                    f"{type(continuation).__name__} {continuation!r}, not text"
                )
            images = images_of(doc_to_visual(doc), f"task {task}, {split} doc {doc_id}")
            pair = continuation_loss(self.model, images, context, continuation)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), pair)
            out.append(_passed_through(pair))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "fvl answers single-round questions (generate_until); this task is multi-round"
        )


def _passed_through(pair: tuple[float, bool]) -> Any:
    """``pair`` as lmms-eval's evaluator will hand it to the task. lmms-eval 0.7 passes every model output
    through ``unwrap_generation_output``, which turns anything but a string or a ``GenerationResult`` into
    ``str(output)``, so a ``(loss, is greedy)`` tuple would reach multiple-choice scoring as text;
    a ``GenerationResult`` carries it through unchanged (0.6 has neither and takes the tuple)."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:
        return pair
    return GenerationResult(text=pair)  # type: ignore[arg-type]
