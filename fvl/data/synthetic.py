"""A deterministic generator of images with captions and questions, covering the skills the paper's
benchmarks group by, so a tiny model can learn something measurable on a CPU in minutes.

Kinds (skill in brackets): ``colour``, ``shape``, ``count``, ``position`` (general VQA), ``ocr`` (a short word
drawn into the image), ``chart`` (bar chart with labelled bars), ``pope`` ("is there a <shape>?", half of
them negatives). Answers are single words. Sample ``i`` of split ``s`` is drawn from its own RNG seeded with
``(seed, s, i)``, so the same call always gives the same sample on any machine and the train / val / test
splits share no seed. ``task="caption"`` gives stage-1 samples (a description of the whole image),
``task="qa"`` stage-2 samples (one question and its answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 170),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = [
    "cat",
    "dog",
    "sun",
    "car",
    "red",
    "box",
    "map",
    "pen",
    "cup",
    "hat",
    "bus",
    "egg",
    "fox",
    "owl",
    "key",
    "ink",
    "tree",
    "lamp",
    "ship",
    "frog",
    "bell",
    "milk",
    "rose",
    "star",
    "moon",
    "book",
    "door",
    "fish",
    "king",
    "ball",
    "gold",
    "ring",
    "wolf",
]
KINDS = {
    "colour": "general",
    "shape": "general",
    "count": "general",
    "position": "general",
    "ocr": "ocr",
    "chart": "chart",
    "pope": "pope",
}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is in the image?",
    "count": "How many shapes are there?",
    "position": "Is the {a} left or right of the {b}?",
    "ocr": "What is the text in the image?",
    "chart": "What is the value of {bar}?",
    "pope": "Is there a {shape} in the image?",
}
# Chance level of each kind for a model that only knows the answer set (what an evaluation compares with).
CHANCE = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "count": 1 / 3,
    "position": 1 / 2,
    "ocr": 1 / len(WORDS),
    "chart": 1 / 9,
    "pope": 1 / 2,
}
# Bumped whenever the drawings change, so that shards built by an older generator are rebuilt.
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
TASKS = ("caption", "qa")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass
class SyntheticSample:
    image: Image.Image
    caption: str
    question: str
    answer: str
    kind: str
    skill: str
    id: str

    def conversations(self, task: str) -> list[dict[str, str]]:
        """LLaVA-format turns: the caption for ``task="caption"``, the question for ``task="qa"``."""
        if task == "caption":
            return [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": self.caption},
            ]
        return [
            {"from": "human", "value": f"<image>\n{self.question}"},
            {"from": "gpt", "value": self.answer},
        ]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded font: the same glyphs everywhere


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: str) -> None:
    fill = COLOURS[colour]
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _where(box: tuple[int, int, int, int], size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    horiz = "left" if cx < size * 0.4 else "right" if cx > size * 0.6 else "centre"
    vert = "top" if cy < size * 0.4 else "bottom" if cy > size * 0.6 else "middle"
    return "in the centre" if horiz == "centre" and vert == "middle" else f"at the {vert} {horiz}"


def _cells(rng: random.Random, n: int, size: int) -> list[tuple[int, int, int, int]]:
    """``n`` non-overlapping boxes, one per random cell of a 2 x 2 grid, jittered inside the cell."""
    half = size // 2
    side = int(size * 0.3)
    boxes = []
    for cell in rng.sample(range(4), n):
        cx, cy = (cell % 2) * half, (cell // 2) * half
        x = cx + rng.randint(1, max(1, half - side - 1))
        y = cy + rng.randint(1, max(1, half - side - 1))
        boxes.append((x, y, x + side, y + side))
    return boxes


def generate(
    index: int,
    split: str = "train",
    seed: int = 0,
    image_size: int = 64,
    kinds: tuple[str, ...] | None = None,
) -> SyntheticSample:
    """Sample ``index`` of ``split``: deterministic in all its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if image_size < 32:
        raise ValueError("synthetic images need at least 32 px")
    kinds = tuple(kinds or KINDS)
    rng = random.Random(f"fvl-synthetic/{seed}/{split}/{index}")
    kind = kinds[rng.randrange(len(kinds))]
    size = image_size
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fmt = {}

    if kind in ("colour", "shape"):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        # Large enough that a circle's missing corners span whole 16 px DaViT tokens of the tiny preset.
        side = rng.randint(int(size * 0.45), int(size * 0.7))
        x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
        box = (x, y, x + side, y + side)
        _draw_shape(draw, shape, box, colour)
        caption = f"a {colour} {shape} {_where(box, size)}."
        answer = colour if kind == "colour" else shape
    elif kind in ("count", "pope"):
        n = rng.randint(1, 3)
        if kind == "pope":
            target, positive = rng.choice(SHAPES), rng.random() < 0.5
            pool = list(SHAPES) if positive else [s for s in SHAPES if s != target]
            shapes = [rng.choice(pool) for _ in range(n)]
            if positive and target not in shapes:
                shapes[rng.randrange(n)] = target
            answer, fmt = ("yes" if positive else "no"), {"shape": target}
            colours = [rng.choice(list(COLOURS)) for _ in range(n)]
        else:
            shapes, colours = [rng.choice(SHAPES)] * n, [rng.choice(list(COLOURS))] * n
            answer = str(n)
        boxes = _cells(rng, n, size)
        parts = []
        for shape, colour, box in zip(shapes, colours, boxes, strict=True):
            _draw_shape(draw, shape, box, colour)
            parts.append(f"a {colour} {shape} {_where(box, size)}")
        caption = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: " + ", ".join(parts) + "."
    elif kind == "position":
        a, b = rng.sample(SHAPES, 2)
        left_first = rng.random() < 0.5
        side = int(size * 0.3)
        ys = [rng.randint(2, size - side - 2) for _ in range(2)]
        xl, xr = rng.randint(2, size // 2 - side - 1), rng.randint(size // 2 + 1, size - side - 2)
        left, right = (a, b) if left_first else (b, a)
        _draw_shape(draw, left, (xl, ys[0], xl + side, ys[0] + side), rng.choice(list(COLOURS)))
        _draw_shape(draw, right, (xr, ys[1], xr + side, ys[1] + side), rng.choice(list(COLOURS)))
        caption = f"a {left} on the left and a {right} on the right."
        answer, fmt = ("left" if left_first else "right"), {"a": a, "b": b}
    elif kind == "ocr":
        word = rng.choice(WORDS)
        font = _font(max(10, size // 4))
        x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
        w, h = x1 - x0, y1 - y0
        x = rng.randint(1, max(1, size - w - 2)) - x0
        y = rng.randint(1, max(1, size - h - 2)) - y0
        draw.text((x, y), word, fill=(0, 0, 0), font=font)
        caption = f'the word "{word}" written in black.'
        answer = word
    elif kind == "chart":
        values = [rng.randint(1, 9) for _ in range(3)]
        labels = ["A", "B", "C"]
        font = _font(max(8, size // 6))
        base, top = size - size // 5, size // 10
        width = size // 5
        for i, (label, value) in enumerate(zip(labels, values, strict=True)):
            x = size // 10 + i * (width + size // 10)
            height = (base - top) * value // 9
            draw.rectangle((x, base - height, x + width, base), fill=COLOURS["blue"])
            draw.text((x + width // 4, base + 1), label, fill=(0, 0, 0), font=font)
        bar = rng.randrange(3)
        caption = (
            "a bar chart: " + ", ".join(f"{lab} = {v}" for lab, v in zip(labels, values, strict=True)) + "."
        )
        answer, fmt = str(values[bar]), {"bar": labels[bar]}
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; known: {', '.join(KINDS)}")

    return SyntheticSample(
        image=image,
        caption=caption[0].upper() + caption[1:],
        question=QUESTIONS[kind].format(**fmt),
        answer=answer,
        kind=kind,
        skill=KINDS[kind],
        id=f"synthetic-{seed}-{split}-{index}",
    )
