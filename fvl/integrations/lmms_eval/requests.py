"""What the ``fvl`` model does with lmms-eval's requests, without importing lmms-eval: load the checkpoint,
read each request's generation settings, batch the requests, cut answers at the task's stop strings, and
score a continuation's likelihood (multiple-choice tasks).

Answers come from ``fvl.eval.evaluate.generate_answers``, the function ``fvl eval`` answers with: same prompt
layout (lmms-eval's llava's), same greedy decoding, same stripping. Requests are answered in lmms-eval's order,
``batch_size`` at a time (a batch never mixes generation settings), so a task that asks the questions of an
``fvl eval`` benchmark in the same order and batch size gets the same answers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# lmms-eval's llava answers up to 1024 tokens when a task sets no max_new_tokens (fvl eval's benchmarks too)
DEFAULT_MAX_NEW_TOKENS = 1024


def load_model(checkpoint: str | Path, runs: str | Path = "runs"):
    """The fvl model of ``checkpoint`` in eval mode: a folder written by ``fvl export`` (it holds
    ``fvl_config.yaml``), else whatever ``fvl eval`` takes (a weights file, a run folder, ``latest``)."""
    from fvl.convert.export import CONFIG_FILE, load_exported
    from fvl.models import load_for_inference

    path = Path(checkpoint)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return load_exported(path).eval()
    return load_for_inference(checkpoint, runs)


@dataclass(frozen=True)
class Generation:
    """A request's generation settings that fvl honours: the answer length and the stop strings."""

    max_new_tokens: int
    until: tuple[str, ...] = ()


def generation(
    gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> Generation:
    """A task's ``generation_kwargs`` as fvl reads them. fvl decodes greedily (as ``fvl eval`` does): a task
    that asks for sampling or beams is answered greedily, with a warning, since refusing would leave it
    unscored. ``until`` (a string or a list) cuts answers at the first stop string."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"generation_kwargs until={until!r}: expected a string or a list of strings")
    tokens = kwargs.get("max_new_tokens", default_max_new_tokens)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise ValueError(f"generation_kwargs max_new_tokens={tokens!r}: expected a positive integer")
    # as lmms-eval's llava reads them: temperature > 0 samples, and so does do_sample; num_beams > 1 searches
    sampling = {
        k: v
        for k, v in kwargs.items()
        if (k == "temperature" and (v or 0) > 0)
        or (k == "do_sample" and v)
        or (k == "num_beams" and (v or 1) > 1)
    }
    if sampling:
        log.warning("fvl decodes greedily; ignoring the task's %s", sampling)
    return Generation(tokens, tuple(u for u in until if u))


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (stripped, as fvl's answers are)."""
    end = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
    return text[:end].strip()


def batches(keys: Sequence[Generation], batch_size: int) -> list[list[int]]:
    """Request indices in order, ``batch_size`` at a time, a new batch wherever the settings change."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    out: list[list[int]] = []
    for i, key in enumerate(keys):
        if out and len(out[-1]) < batch_size and keys[out[-1][0]] == key:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def images_of(visuals: Any, where: str) -> list[Any]:
    """A request's visuals as the list of PIL images fvl answers about (none: a text-only question)."""
    from PIL import Image

    items = [] if visuals is None else list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    for item in items:
        if not isinstance(item, Image.Image):
            raise ValueError(
                f"{where}: doc_to_visual gave a {type(item).__name__}; fvl answers about images (PIL), "
                "not videos or audio"
            )
    return items


def continuation_loss(model, images: list[Any], context: str, continuation: str) -> tuple[float, bool]:
    """What lmms-eval's ``loglikelihood`` returns for one request, as its llava returns it and as its
    multiple-choice scoring reads it (the choice with the *smallest* value wins): the mean negative
    log-likelihood per token of ``continuation`` right after the prompt fvl answers ``context`` with (its
    images' placeholders as ``fvl eval`` places them, the chat template, the assistant's turn opened), and
    whether greedy decoding would produce exactly those tokens. The continuation is tokenised on its own,
    as the assistant's text starts there; an empty one scores (0.0, True)."""
    ids = list(model.tokenizer(continuation, add_special_tokens=False).input_ids)
    logprob, greedy = tokens_logprob(model, images, context, ids)
    return (-logprob / len(ids) if ids else 0.0), greedy


def tokens_logprob(model, images: list[Any], context: str, target_ids: list[int]) -> tuple[float, bool]:
    """The summed log-probability of ``target_ids`` after the prompt of ``context`` (as ``continuation_loss``
    builds it) and whether they are the greedy tokens: one forward pass over prompt + tokens."""
    import torch

    from fvl.eval.evaluate import image_prompt

    if not target_ids:
        return 0.0, True
    prompt = image_prompt(model, context, len(images))
    token = model.tokenizer.image_token
    if images and token not in prompt:  # one image: the layout FlorenceVL.generate gives it
        prompt = f"{token}\n" * len(images) + prompt
    prompt_ids = list(model.template.prompt(prompt, model.tokenizer, model.num_image_tokens).input_ids)
    device = next(model.llm.parameters()).device
    ids = torch.tensor([prompt_ids + target_ids], device=device)
    pixels = model.preprocess(images).to(device) if images else None
    with torch.no_grad():
        logits = model.llm(inputs_embeds=model.embed(ids, pixels)).logits[0, len(prompt_ids) - 1 : -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(target_ids, device=device)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())
