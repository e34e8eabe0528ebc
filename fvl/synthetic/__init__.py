"""A deterministic generator of images with captions and questions, covering the skills the paper's
benchmarks group by, so a tiny model can learn something measurable on a CPU in minutes.

Kinds (skill in brackets): ``colour``, ``shape``, ``count``, ``position`` (general VQA), ``ocr`` (a short word
drawn into the image), ``chart`` (bar chart with labelled bars), ``pope`` ("is there a <shape>?", half of
them negatives). Answers are single words. ``task="caption"`` gives stage-1 samples (a description of the
whole image), ``task="qa"`` stage-2 samples (one question and its answer).

Splits partition the content, not only the seeds: the images are few enough (a chart has 9^3 value
combinations) that independent draws per split would put test items into training. The first byte of an
image's SHA-256 (``image_hash``), modulo ``PARTITION``, gives its class: one class is the test split's, one
the val split's, the rest train's (``split_of``). Sample ``i`` of split ``s`` draws its kind from an RNG seeded
with ``(seed, s, i)``, then redraws its content (an RNG seeded with ``(seed, s, i, attempt)``) until the image
falls in the class of ``s``. So the same call always gives the same sample on any machine, and no val or test
image is ever a training image, however many training samples are drawn, with any seed or question.
``content_hash`` identifies an item (image, question and answer), e.g. to check that for a data set.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
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
# Three-letter words only: drawn at 3/8 of the side, each letter spans about one image token of the tiny
# preset, the smallest text it can resolve.
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
    "position": "Is the larger shape on the left or the right?",
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
# 3: every split draws only images of its own class of the content partition (``split_of``).
# 4: OCR words are three letters drawn at 3/8 of the side; position questions name colour and shape.
# 5: position asks where the larger of two shapes is (the answer is in the picture, not in a name); OCR
#    words are centred, moved by up to 1/16 of the side.
GENERATOR_VERSION = 5
SPLITS = ("train", "val", "test")
# The content partition: the first byte of an image's hash, modulo ``PARTITION``, picks its split. One class
# each for test and val, the rest for train: a held-out sample costs ``PARTITION`` draws on average, a
# training sample ``PARTITION / (PARTITION - 2)``.
PARTITION = 8
SPLIT_CLASS = {0: "test", 1: "val"}
MAX_ATTEMPTS = 1000
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
    # What Florence-2's own tasks read from the picture (stage 0): each object's description and pixel box
    # (x0, y0, x1, y1), and the text drawn in it (empty when there is none).
    regions: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    text: str = ""

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


def image_hash(image: Image.Image) -> str:
    """SHA-256 of an image's pixels, size and mode: equal exactly when two images are identical."""
    h = hashlib.sha256(f"{image.mode}/{image.width}x{image.height}/".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def content_hash(sample: SyntheticSample) -> str:
    """SHA-256 of what a model sees and must answer: the image's pixels, the question and the answer."""
    h = hashlib.sha256(image_hash(sample.image).encode())
    for text in (sample.question, sample.answer):
        h.update(b"\0" + text.encode())
    return h.hexdigest()


def split_of(image: Image.Image) -> str:
    """The split whose class of the content partition holds ``image``.

    The partition goes by the image alone, not by the question: a test picture is then never seen in
    training, neither under another question nor as a caption (a chart's caption states every bar)."""
    return SPLIT_CLASS.get(int(image_hash(image)[:2], 16) % PARTITION, "train")


def generate(
    index: int,
    split: str = "train",
    seed: int = 0,
    image_size: int = 64,
    kinds: tuple[str, ...] | None = None,
) -> SyntheticSample:
    """Sample ``index`` of ``split``: deterministic in all its arguments, its image in ``split``'s class of
    the content partition (``split_of``), so that no val or test sample is ever a training sample."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if image_size < 32:
        raise ValueError("synthetic images need at least 32 px")
    kinds = tuple(kinds or KINDS)
    rng = random.Random(f"fvl-synthetic/{seed}/{split}/{index}")
    # The kind is drawn once and only the content redrawn, so that each split keeps the mix of kinds.
    kind = kinds[rng.randrange(len(kinds))]
    for attempt in range(MAX_ATTEMPTS):
        if attempt:  # a fresh RNG per attempt: the accepted draw depends on the arguments alone
            rng = random.Random(f"fvl-synthetic/{seed}/{split}/{index}/{attempt}")
        d = _draw(kind, rng, image_size)
        if split_of(d.image) == split:
            return SyntheticSample(
                image=d.image,
                caption=d.caption[0].upper() + d.caption[1:],
                question=d.question,
                answer=d.answer,
                kind=kind,
                skill=KINDS[kind],
                id=f"synthetic-{seed}-{split}-{index}",
                regions=d.regions,
                text=d.text,
            )
    raise RuntimeError(f"synthetic {kind} sample {index}: no {split} image in {MAX_ATTEMPTS} draws")


@dataclass
class _Drawing:
    image: Image.Image
    caption: str
    question: str
    answer: str
    regions: list[tuple[str, tuple[int, int, int, int]]]
    text: str


def _draw(kind: str, rng: random.Random, size: int) -> _Drawing:
    """One random picture of ``kind``: the image, its caption, question and answer, its regions and text."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fmt = {}
    regions: list[tuple[str, tuple[int, int, int, int]]] = []
    text = ""

    if kind in ("colour", "shape"):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        # Large enough that a circle's missing corners span whole 16 px DaViT tokens of the tiny preset.
        side = rng.randint(int(size * 0.45), int(size * 0.7))
        x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
        box = (x, y, x + side, y + side)
        _draw_shape(draw, shape, box, colour)
        regions.append((f"{colour} {shape}", box))
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
            regions.append((f"{colour} {shape}", box))
            parts.append(f"a {colour} {shape} {_where(box, size)}")
        caption = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: " + ", ".join(parts) + "."
    elif kind == "position":
        # A relation read from the picture: two shapes, one clearly larger, one in each half; which side is
        # the larger on? A question that names an object instead ("Is the red circle left or right of the
        # blue square?") asks the LLM to bind a word to image tokens, which the tiny preset never learned:
        # exactly chance at 2 or 4 layers, up to 1500 steps of position questions alone (BENCHMARKS.md).
        big, small = rng.randint(size * 36 // 100, size * 44 // 100), rng.randint(size * 18 // 100, size // 4)
        left_big = rng.random() < 0.5
        sides = (big, small) if left_big else (small, big)
        half = size // 2
        placed = []
        for i, (side, shape, colour) in enumerate(
            zip(sides, rng.sample(SHAPES, 2), rng.sample(list(COLOURS), 2), strict=True)
        ):
            # (max() keeps the ranges non-empty at 32 px and leaves the draws at 64 px unchanged)
            left_x, right_x = (2, max(2, half - side - 1)), (half + 1, max(half + 1, size - side - 2))
            x = rng.randint(*left_x) if i == 0 else rng.randint(*right_x)
            y = rng.randint(2, max(2, size - side - 2))
            box = (x, y, x + side, y + side)
            _draw_shape(draw, shape, box, colour)
            regions.append((f"{colour} {shape}", box))
            placed.append(f"a {'large' if side == big else 'small'} {colour} {shape}")
        caption = f"{placed[0]} on the left and {placed[1]} on the right."
        answer = "left" if left_big else "right"
    elif kind == "ocr":
        word = rng.choice(WORDS)
        # Three letters at 3/8 of the picture's side: about one 16 px DaViT token a letter at 64 px (at 1/4
        # with four-letter words the tiny tower never read them: OCR stayed at chance). Centred, moved by up
        # to 1/16 of the side each way: the tiny preset reads words placed anywhere no better than chance,
        # and words moved by up to 1/8 hardly better (BENCHMARKS.md, generator 5).
        font = _font(max(10, size * 3 // 8))
        x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
        w, h = x1 - x0, y1 - y0
        jitter = max(1, size // 16)
        x = (size - w) // 2 + rng.randint(-jitter, jitter) - x0
        y = (size - h) // 2 + rng.randint(-jitter, jitter) - y0
        draw.text((x, y), word, fill=(0, 0, 0), font=font)
        regions.append(("text", draw.textbbox((x, y), word, font=font)))
        text = word
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
            regions.append((f"bar {label}", (x, base - height, x + width, base)))
        text = " ".join(labels)
        bar = rng.randrange(3)
        caption = (
            "a bar chart: " + ", ".join(f"{lab} = {v}" for lab, v in zip(labels, values, strict=True)) + "."
        )
        answer, fmt = str(values[bar]), {"bar": labels[bar]}
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; known: {', '.join(KINDS)}")

    return _Drawing(image, caption, QUESTIONS[kind].format(**fmt), answer, regions, text)
