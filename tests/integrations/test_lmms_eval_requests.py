"""What the lmms-eval adapter does with requests, without lmms-eval: generation settings, stop strings,
batches, visuals, and a continuation's likelihood against a step-by-step greedy reference."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fvl.integrations.lmms_eval.requests import (
    Generation,
    batches,
    continuation_loss,
    cut_at_stops,
    generation,
    images_of,
    tokens_logprob,
)


def test_generation_settings_stop_strings_and_batches(caplog):
    assert generation({"until": ["\n\n", ""], "max_new_tokens": 16}) == Generation(16, ("\n\n",))
    assert generation({"until": "ASSISTANT:"}, default_max_new_tokens=7) == Generation(7, ("ASSISTANT:",))
    assert generation(None) == Generation(1024)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generation({"max_new_tokens": 0})
    with pytest.raises(ValueError, match="until=3"):
        generation({"until": 3})
    generation({"temperature": 0, "do_sample": False, "num_beams": 1, "top_p": 1.0})
    assert not caplog.records
    generation({"temperature": 0.2, "num_beams": 1})
    assert "ignoring the task's {'temperature': 0.2}" in caplog.text
    assert cut_at_stops(" red\n\nblue ASSISTANT: x", ["ASSISTANT:", "\n\n"]) == "red"
    assert cut_at_stops("red ASSISTANT: x\n\n", ["\n\n", "ASSISTANT:"]) == "red"
    assert cut_at_stops("red blue", ["\n\n"]) == "red blue"
    a, b = Generation(16, ("\n\n",)), Generation(32, ("\n\n",))
    assert batches([a, a, a, b, b, a], 2) == [[0, 1], [2], [3, 4], [5]]
    with pytest.raises(ValueError, match="batch_size=0"):
        batches([a], 0)
    image = Image.new("RGB", (4, 4))
    assert (
        images_of([image], "x") == [image] and images_of(None, "x") == [] and images_of(image, "x") == [image]
    )
    with pytest.raises(ValueError, match="task t, doc 3: doc_to_visual gave a str"):
        images_of(["clip.mp4"], "task t, doc 3")


def reference_greedy(model, image, context, steps):
    """Greedy tokens and their log-probabilities, one full forward per step (no cache, no slicing shared
    with the code under test)."""
    prompt = f"{model.tokenizer.image_token}\n{context}"  # one image, as the model lays it out
    ids = list(model.template.prompt(prompt, model.tokenizer, model.num_image_tokens).input_ids)
    pixels = model.preprocess([image])
    chosen, logprobs = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model.llm(inputs_embeds=model.embed(torch.tensor([ids]), pixels)).logits[0, -1].float()
            step = torch.log_softmax(logits, dim=-1)
            token = int(step.argmax())
            chosen.append(token)
            logprobs.append(step)
            ids.append(token)
    return chosen, logprobs


def test_continuation_logprob_matches_a_step_by_step_reference(tiny_model):
    model, image, context = tiny_model, Image.new("RGB", (40, 30), (200, 20, 20)), "What colour is it?"
    greedy, steps = reference_greedy(model, image, context, 3)
    ll, is_greedy = tokens_logprob(model, [image], context, greedy)
    expected = sum(float(s[t]) for s, t in zip(steps, greedy, strict=True))
    assert is_greedy and ll == pytest.approx(expected, abs=1e-4)
    other = greedy[:2] + [int(steps[2].argsort()[-2])]  # the runner-up as the last token
    ll_other, is_greedy = tokens_logprob(model, [image], context, other)
    assert not is_greedy
    assert ll_other == pytest.approx(ll - float(steps[2][greedy[2]] - steps[2][other[2]]), abs=1e-4)
    assert tokens_logprob(model, [image], context, []) == (0.0, True)
    # lmms-eval's value for text: the mean negative log-likelihood of the tokenizer's ids for it, on their own
    text = " red square"
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    logprob, greedy = tokens_logprob(model, [image], context, ids)
    assert continuation_loss(model, [image], context, text) == (-logprob / len(ids), greedy)
    assert continuation_loss(model, [image], context, "") == (0.0, True)
