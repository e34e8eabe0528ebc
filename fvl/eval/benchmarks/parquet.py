"""Local parquet copies of benchmarks (the Hugging Face ``datasets`` layout lmms-eval reads), read without
decoding their images: rows come without the image column, and each image is a reference that reads one
row group's image column when first asked (one row group is cached per file, so a benchmark read in order
reads every row group once).

Images live either in a column of the question rows, or, as GQA's, in a separate table joined on an id
(``ImageIndex``)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from fvl.eval.benchmarks.sample import ImageRef

# File name prefixes of the Hugging Face layout (``data/validation-00000-of-00003.parquet``).
SPLIT_PREFIXES = ("train", "validation", "val", "test", "testdev", "dev")


def split_files(path: Path, split: str) -> list[Path]:
    """A parquet file, or a folder's parquet files (or its ``data/``'s). When the names carry split
    prefixes, only ``split``'s are taken, so pointing at a whole dataset folder never mixes splits."""
    if path.is_file():
        return [path]
    folder = path / "data" if not list(path.glob("*.parquet")) and (path / "data").is_dir() else path
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files at {path}")
    prefixed = [f for f in files if f.name.split("-")[0] in SPLIT_PREFIXES]
    if prefixed:
        files = [f for f in files if f.name.split("-")[0] == split]
        if not files:
            found = sorted({f.name.split("-")[0] for f in prefixed})
            raise FileNotFoundError(f"no {split!r} files at {folder} (splits there: {', '.join(found)})")
    return files


def decode_image(value: Any) -> Image.Image:
    """A ``datasets`` Image value as stored in parquet (``{"bytes": ..., "path": ...}``, or raw bytes)."""
    if isinstance(value, dict):
        value = value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else None)
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    raise ValueError(f"no image data ({type(value).__name__})")


def _has_image(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value.get("bytes") or value.get("path"))
    if isinstance(value, list):
        return bool(value) and all(_has_image(v) for v in value)
    return isinstance(value, (bytes, bytearray)) and bool(value)


class ParquetImages:
    """Lazy access to one file's image column, by row number."""

    def __init__(self, file: Path, column: str) -> None:
        import pyarrow.parquet as pq

        self.file, self.column = file, column
        self._pf = pq.ParquetFile(file)
        starts, n = [], 0
        for i in range(self._pf.num_row_groups):
            starts.append(n)
            n += self._pf.metadata.row_group(i).num_rows
        self._starts, self.num_rows = starts, n
        self._cached: tuple[int, list[Any]] | None = None

    def _group_of(self, row: int) -> int:
        import bisect

        return bisect.bisect_right(self._starts, row) - 1

    def _group(self, group: int) -> list[Any]:
        if self._cached is None or self._cached[0] != group:
            table = self._pf.read_row_group(group, columns=[self.column])
            self._cached = (group, table.column(0).to_pylist())
        return self._cached[1]

    def value(self, row: int) -> Any:
        group = self._group_of(row)
        return self._group(group)[row - self._starts[group]]

    def refs(self, row: int, count: int) -> list[ImageRef]:
        """``count`` references, one per image of the row (an image column may hold a list of images)."""
        return [lambda row=row, k=k: self._decode(row, k) for k in range(count)]

    def _decode(self, row: int, k: int) -> Image.Image:
        value = self.value(row)
        return decode_image(value[k] if isinstance(value, list) else value)

    def counts(self) -> list[int]:
        """Images per row (0: the row has none, or one of its images has no data), read one row group at a
        time: the load checks every row without holding more than one group's images."""
        counts = []
        for group in range(len(self._starts)):
            counts += [
                (len(v) if isinstance(v, list) else 1) if _has_image(v) else 0 for v in self._group(group)
            ]
        self._cached = None
        return counts


def iter_rows(file: Path, skip_columns: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The rows of ``file`` as dicts, without the columns in ``skip_columns`` (the images)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    columns = [c for c in pf.schema_arrow.names if c not in skip_columns]
    for group in range(pf.num_row_groups):
        yield from pf.read_row_group(group, columns=columns).to_pylist()


class ImageIndex:
    """Images kept in their own table, found by id (GQA: ``testdev_balanced_images``, column ``id``, joined
    on the questions' ``imageId``)."""

    def __init__(self, path: Path, split: str, id_column: str = "id", image_column: str = "image") -> None:
        import pyarrow.parquet as pq

        self._where: dict[str, tuple[ParquetImages, int]] = {}
        for file in split_files(path, split):
            images = ParquetImages(file, image_column)
            ids = pq.read_table(file, columns=[id_column]).column(0).to_pylist()
            for row, (image_id, count) in enumerate(zip(ids, images.counts(), strict=True)):
                if count:  # an id without image data counts as absent: its questions are refused at load
                    self._where[str(image_id)] = (images, row)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._where

    def refs(self, image_id: str) -> list[ImageRef]:
        images, row = self._where[str(image_id)]
        return images.refs(row, 1)
