"""Florence-2's own tasks on the synthetic pictures, written as Florence-2 writes them: a task token (fed as
its prompt text), and a target text in which each box is four location tokens ``<loc_0>`` .. ``<loc_999>``
(x0, y0, x1, y1, each quantised to 1000 bins of the image side).

- ``<DETAILED_CAPTION>``: every object, with colour, shape and place (the synthetic caption);
- ``<OCR>``: the words drawn in the picture (empty when none are);
- ``<DENSE_REGION_CAPTION>``: each object's description followed by its box.
"""

from __future__ import annotations

import re

from fvl.synthetic import SyntheticSample

LOC_BINS = 1000
TASKS = ("<DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>")
_REGION = re.compile(r"([^<]+?)\s*((?:<loc_\d+>){4})")
_LOC = re.compile(r"<loc_(\d+)>")

Box = tuple[float, float, float, float]


def loc_tokens() -> list[str]:
    """The 1000 location tokens Florence-2's tokenizer adds."""
    return [f"<loc_{i}>" for i in range(LOC_BINS)]


def quantize(box: Box, size: int) -> list[int]:
    """Pixel box -> four bins: ``floor(coord / size * 1000)``, clamped to 0..999."""
    return [min(LOC_BINS - 1, max(0, int(c / size * LOC_BINS))) for c in box]


def dequantize(bins: list[int], size: int) -> Box:
    """Bins -> the pixel box at their centres (Florence-2's post-processing)."""
    x0, y0, x1, y1 = ((b + 0.5) * size / LOC_BINS for b in bins)
    return x0, y0, x1, y1


def region_text(regions: list[tuple[str, Box]], size: int) -> str:
    return "".join(label + "".join(f"<loc_{b}>" for b in quantize(box, size)) for label, box in regions)


def parse_regions(text: str, size: int) -> list[tuple[str, Box]]:
    """A ``<DENSE_REGION_CAPTION>`` / ``<OD>`` answer -> (label, pixel box) pairs; malformed parts dropped."""
    out = []
    for label, locs in _REGION.findall(text):
        bins = [int(b) for b in _LOC.findall(locs)]
        if all(b < LOC_BINS for b in bins):
            out.append((label.strip(), dequantize(bins, size)))
    return out


def targets(sample: SyntheticSample, size: int) -> dict[str, str]:
    """Each task's target text for one picture."""
    return {
        "<DETAILED_CAPTION>": sample.caption,
        "<OCR>": sample.text,
        "<DENSE_REGION_CAPTION>": region_text(sample.regions, size),
    }


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
