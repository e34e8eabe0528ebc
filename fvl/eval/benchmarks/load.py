"""Reading a local benchmark copy into a ``Benchmark``: rows without their images, every row checked for
image data at load (a question without its image would be scored on text alone and nothing would say
so), images joined from their own table where the layout keeps them apart (GQA)."""

from __future__ import annotations

from pathlib import Path

from fvl.eval.benchmarks.parquet import ImageIndex, ParquetImages, iter_rows, split_files
from fvl.eval.benchmarks.sample import Benchmark, EvalSample
from fvl.eval.benchmarks.spec import BENCHMARKS, BenchmarkSpec


def load_parquet(
    name: str, path: str | Path, limit: int | None = None, split: str | None = None
) -> Benchmark:
    """Benchmark ``name`` from its local parquet copy at ``path`` (a file, a split folder or the dataset
    folder; ``split``: the file-name split to take there, default the spec's). Images stay undecoded."""
    spec = BENCHMARKS.build(name)
    path = Path(path)
    if spec.subfolder and path.is_dir() and (path / spec.subfolder).is_dir():
        path = path / spec.subfolder  # the hub dataset's folder, given whole
    index = None
    if spec.image_join is not None:
        join = spec.image_join
        if not (path / join.questions).is_dir() or not (path / join.images).is_dir():
            raise FileNotFoundError(
                f"{name}: expected the folders {join.questions}/ (questions) and {join.images}/ (images, joined "
                f"on {join.key}) under {path}"
            )
        index = ImageIndex(path / join.images, split or spec.split, join.id_column, spec.image_column)
        path = path / join.questions
    samples: list[EvalSample] = []
    missing: list[str] = []
    try:
        files = split_files(path, split or spec.split)
    except FileNotFoundError as e:
        if spec.subfolder:
            raise FileNotFoundError(
                f"{name}: {e} (nor in its {spec.subfolder}/ folder, as the hub lays it out)"
            ) from None
        raise
    for file in files:
        samples += _read_file(name, spec, file, index, missing, limit and limit - len(samples))
        if limit and len(samples) >= limit:
            break
    if missing:
        raise ValueError(
            f"{name}: {len(missing)} of {len(samples) + len(missing)} questions have no image "
            f"(ids {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
            "every question of this benchmark is asked about its image"
        )
    labelled = {bool(s.references) for s in samples}
    if len(labelled) > 1:
        raise ValueError(f"{name}: some rows have answers and some have none; score a split or submit it")
    return Benchmark(name, spec, samples, dict(spec.chance), read_split=split or "")


def _read_file(
    name: str,
    spec: BenchmarkSpec,
    file: Path,
    index: ImageIndex | None,
    missing: list[str],
    limit: int | None,
) -> list[EvalSample]:
    images = None
    counts: list[int] = []
    if index is None:
        import pyarrow.parquet as pq

        if spec.image_column not in pq.ParquetFile(file).schema_arrow.names:
            raise ValueError(f"{name}: {file} has no {spec.image_column!r} column")
        images = ParquetImages(file, spec.image_column)
        counts = images.counts()
    samples = []
    for i, raw in enumerate(iter_rows(file, skip_columns=(spec.image_column,))):
        row = spec.read(raw)
        sid = str(raw.get(spec.id_column, f"{file.stem}-{i}"))
        if index is not None:
            key = raw.get(spec.image_join.key)
            refs = index.refs(key) if key is not None and key in index else []
        else:
            refs = images.refs(i, counts[i]) if counts[i] else []
        if not refs:
            missing.append(sid)
            continue
        samples.append(EvalSample(sid, row.prompt, row.references, row.group, row.options, refs, row.fields))
        if limit and len(samples) >= limit:
            break
    return samples
