"""A feature cache: the fused vision features of every sample, computed once by a frozen tower, so that a stage
whose tower and fusion train nothing (finetune, align) reads them instead of running the tower each step.

Layout (``fvl features build CHECKPOINT --shards DIR --out CACHE``, see ``fvl.data.feature_cache.build``)::

    CACHE/features.json          the manifest: what the features were computed with (``identity``), the sample
                                 shards they belong to (each one's sha256) and the feature shards written
    CACHE/<shard name>.tar       one feature shard per sample shard, same name, same samples in the same order
    CACHE/<shard name>.tar.idx.npy   its span index (``fvl.data.tarindex``)

A feature shard holds, per sample and under the sample's key, ``KEY.json`` (``{"shape": [images, tokens,
dim], "dtype": ...}``, or ``{"skip": reason}`` for a sample whose images the build could not decode) and
``KEY.bin``, the raw little-endian tensor bytes (never a pickle). Sample ``i`` of a shard has its features at
span ``i`` of the feature shard, so a reader fetches both with one ``pread`` each.

A cache is refused (``check_cache``) when anything it depends on differs from the run's: the tower's and the
fusion's weights (a sha256 over their state), the tower, the fusion and its feature set, the resize mode,
or the sample shards (rebuilt since). The stored dtype (bf16 by default) is the run's to read.

One exception serves sweeps: a cache of features side by side (``dbfusion``, a channel concat, over a set of
features; ``fvl features build --all-features`` stores all of the tower's) holds every feature separately,
so any parameter-free fusion over a subset of them can be computed from it as each sample is read
(``FeatureSelection``). One cache then serves every variant of a fusion sweep (`dbfusion`, `token_concat`,
`avg_pool`, the leave-one-out ablations) instead of one cache per variant.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvl.data.sources import Skip
from fvl.data.tarindex import load_index, parse_sample

MANIFEST = "features.json"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FeatureCacheError(ValueError):
    """A feature cache that does not belong to this run (or is damaged); the message says what differs."""


def weights_sha256(*modules: torch.nn.Module) -> str:
    """A sha256 over the names, dtypes, shapes and bytes of the modules' state (parameters and buffers)."""
    h = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{index}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def identity_of(model: Any, resize_mode: str) -> dict[str, Any]:
    """What a cache built from ``model`` (a ``FlorenceVL``) depends on: the run using it must match all. (The
    manifest adds the stored ``dtype``, which a run reads whatever it is.)"""
    return {
        "weights_sha256": weights_sha256(model.vision, *model.towers.values(), model.fusion),
        "vision": model.cfg.vision.name,
        "image_size": int(model.vision.image_size),
        "fusion": model.cfg.fusion.name,
        "features": list(model.fusion.names),
        "feature_dims": dict(model.fusion.dims),
        "tokens": int(model.num_image_tokens),
        "dim": int(model.fusion.output_dim),
        "resize_mode": resize_mode,
        # What shapes the features besides the weights (the prompt ids are non-persistent buffers, which
        # the weights' hash does not see): the prompts' text and how they are padded, the layers read.
        "prompts": [[p.name, p.text] for p in model.cfg.vision.prompts],
        "prompt_padding": model.cfg.vision.prompt_padding,
        "keep_pooled_token": bool(model.cfg.vision.keep_pooled_token),
        "layers": list(model.cfg.vision.layers),
        # more towers beside the main one (none: the key is left out, so older caches still match)
        **({"towers": _towers_identity(model)} if len(model.towers) else {}),
    }


def _towers_identity(model: Any) -> dict[str, Any]:
    """What shapes the features of the towers beside the main one, besides their weights."""
    cfgs = {key: model.cfg.vision.towers[key] for key in model.towers}  # the towers built (in use)
    return {
        "grid_resampling": model.cfg.vision.grid_resampling,
        "decode_size": int(model.processor.transform.size),
        **{key: {"name": t.name, "image_size": int(t.image_size), "layers": list(t.layers),
                 "prompts": [[p.name, p.text] for p in t.prompts], "prompt_padding": t.prompt_padding,
                 "keep_pooled_token": bool(t.keep_pooled_token)} for key, t in cfgs.items()},
    }  # fmt: skip


# ---- one sample's entry --------------------------------------------------------------------------------------
def encode_entry(features: torch.Tensor | None, skip: str = "") -> dict[str, bytes]:
    """The members of one sample's entry: ``json`` and (when there are images) ``bin``."""
    if skip:
        return {"json": json.dumps({"skip": skip}).encode()}
    t = features.detach().cpu().contiguous()
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    out = {"json": json.dumps(meta).encode()}
    if t.numel():
        out["bin"] = t.view(torch.uint8).numpy().tobytes()
    return out


def decode_entry(raw: dict[str, Any]) -> list[torch.Tensor]:
    """One sample's features, a ``[tokens, dim]`` tensor per image; a sample the build skipped raises
    ``Skip`` with the build's reason."""
    meta = json.loads(raw["json"])
    if "skip" in meta:
        raise Skip(meta["skip"], f"{raw.get('__key__')}: skipped when the feature cache was built")
    shape, dtype = tuple(meta["shape"]), DTYPES[meta["dtype"]]
    if not shape[0]:
        return []
    data = bytearray(raw["bin"])  # writable: torch.frombuffer warns on read-only memory
    expected = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if len(data) != expected:
        raise FeatureCacheError(f"{raw.get('__key__')}: {len(data)} feature bytes, expected {expected}")
    return list(torch.frombuffer(data, dtype=dtype).view(shape).unbind(0))


class EntryWriter:
    """Writes a feature shard's entries in order into a tar (fixed mtime: the same features give the same
    bytes)."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "w")  # noqa: SIM115 - closed by close(), after the last entry

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


# ---- the manifest and its checks -----------------------------------------------------------------------------
def load_cache_manifest(cache: str | Path) -> dict[str, Any]:
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"data.feature_cache={cache}: no {MANIFEST} there; build it with "
            "fvl features build CHECKPOINT --shards DIR --out DIR"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FeatureCacheError(
            f"{path}: feature cache format {manifest.get('format_version')}, this fvl reads {FORMAT_VERSION}; "
            "rebuild it with fvl features build"
        )
    return manifest


def check_cache(
    manifest: dict[str, Any], identity: dict[str, Any], shard_entries: list[dict], where: str
) -> None:
    """Refuse a cache whose identity differs from ``identity`` (the run's model, resize mode and dtype are
    compared key by key) or whose sample shards are not the ones the run reads (``shard_entries``: the shard
    manifest's entries of the shards read, each with ``path`` and ``sha256``)."""
    built = manifest.get("identity", {})
    differ = [k for k in identity if built.get(k) != identity[k]]
    if differ:
        detail = "; ".join(f"{k}: cache {built.get(k)!r}, run {identity[k]!r}" for k in differ)
        hint = (
            " (another checkpoint: the tower or fusion weights differ)" if "weights_sha256" in differ else ""
        )
        raise FeatureCacheError(
            f"data.feature_cache={where} was built for another model or stage{hint}: {detail}. Build a cache "
            "for this run: fvl features build CHECKPOINT --shards DIR --out DIR"
        )
    cached = {s["path"]: s.get("sha256") for s in manifest.get("shards", [])}
    missing = [s["path"] for s in shard_entries if s["path"] not in cached]
    changed = [
        s["path"] for s in shard_entries if s["path"] in cached and cached[s["path"]] != s.get("sha256")
    ]
    if missing or changed:
        raise FeatureCacheError(
            f"data.feature_cache={where} does not cover the shards read: "
            + (f"no features for {missing[:3]}{' ...' if len(missing) > 3 else ''}; " if missing else "")
            + (f"rebuilt since the cache: {changed[:3]}; " if changed else "")
            + "rebuild the cache with fvl features build (--sources to cover the sources read)"
        )


# What a fusion decides; a cache of features side by side may differ from the run in these alone.
FUSION_KEYS = ("fusion", "features", "feature_dims", "tokens", "dim")


@dataclass
class FeatureSelection:
    """Computes a run's fused features from a cache of features side by side (``dbfusion`` over ``names``,
    widths ``dims``): splits the channels back into the named features and applies the run's ``fusion`` (a
    parameter-free module, so it may run in the data loader). Fuses in float32 (the projector casts to its
    own dtype anyway), so ``avg_pool`` averages the stored values without a second rounding."""

    names: list[str]
    dims: dict[str, int]
    fusion: torch.nn.Module

    @classmethod
    def between(
        cls, built: dict[str, Any], run: dict[str, Any], fusion: torch.nn.Module | None
    ) -> FeatureSelection | None:
        """The selection that turns the cache ``built`` (its identity) into the run's features (``run``,
        its identity; ``fusion``, its fusion module), or None when the cache holds the run's fused features
        already or cannot serve it (``check_cache`` then says what differs)."""
        if fusion is None or all(built.get(k) == run.get(k) for k in FUSION_KEYS):
            return None
        names, dims = built.get("features") or [], built.get("feature_dims") or {}
        wanted = run.get("features") or []
        if (
            built.get("fusion") != "dbfusion"
            or not set(wanted) <= set(names)
            or set(dims) != set(names)
            or any(p is not None for p in fusion.parameters())
        ):
            return None
        if any(dims[n] != run.get("feature_dims", {}).get(n, dims[n]) for n in wanted):
            return None  # a feature of another width: not the same tower
        return cls(list(names), {n: int(dims[n]) for n in names}, fusion)

    def __call__(self, side_by_side: torch.Tensor) -> torch.Tensor:
        """``[N, tokens, sum(dims)]`` -> ``[N, run tokens, run dim]``."""
        parts = side_by_side.float().split([self.dims[n] for n in self.names], dim=-1)
        with torch.no_grad():
            return self.fusion(dict(zip(self.names, parts, strict=True)))


@dataclass
class FeatureSpans:
    """Where each sample's features lie, aligned with a sample ``Catalog`` (same ids)."""

    paths: list[str]
    shard: np.ndarray
    start: np.ndarray
    end: np.ndarray
    empty: torch.Tensor  # ``[0, tokens, dim]``: the features of a text-only batch
    select: FeatureSelection | None = None  # a cache of features side by side, fused for the run as read

    @classmethod
    def aligned(
        cls,
        cache: str | Path,
        sample_paths: list[str],
        sample_shard: np.ndarray,
        select: FeatureSelection | None = None,
    ) -> FeatureSpans:
        """The spans of the feature shards named like ``sample_paths``; every shard must hold as many
        entries as its sample shard. ``select``: fuse a cache of features side by side for the run."""
        cache = Path(cache)
        ident = load_cache_manifest(cache)["identity"]
        paths, starts, ends = [], [], []
        counts = np.bincount(sample_shard, minlength=len(sample_paths)) if len(sample_shard) else []
        for i, sample_path in enumerate(sample_paths):
            path = cache / Path(sample_path).name
            spans = (
                load_index(path) if path.is_file() else np.zeros(0, dtype=[("start", "<i8"), ("end", "<i8")])
            )
            want = int(counts[i]) if len(counts) else 0
            if len(spans) != want:
                raise FeatureCacheError(
                    f"{path}: {len(spans)} feature entries for the {want} samples of {sample_path}; the cache "
                    "is incomplete or was built from other shards: rebuild it with fvl features build"
                )
            paths.append(str(path))
            starts.append(spans["start"])
            ends.append(spans["end"])
        empty = torch.empty(0, ident["tokens"], ident["dim"], dtype=DTYPES[ident["dtype"]])
        return cls(
            paths,
            np.asarray(sample_shard, dtype=np.int32),
            np.concatenate(starts) if starts else np.zeros(0, np.int64),
            np.concatenate(ends) if ends else np.zeros(0, np.int64),
            select(empty) if select is not None else empty,
            select,
        )

    def read(self, i: int, fd: int, key: str) -> list[torch.Tensor]:
        """Sample ``i``'s features from the open feature shard ``fd``; its key must be ``key``."""
        start, end = int(self.start[i]), int(self.end[i])
        data = os.pread(fd, end - start, start)
        try:
            raw = parse_sample(data)
        except (tarfile.TarError, ValueError, EOFError) as e:
            raise Skip("corrupt_shard", f"{self.paths[int(self.shard[i])]}@{start}: {e}") from None
        if raw["__key__"] != key:
            raise FeatureCacheError(
                f"{self.paths[int(self.shard[i])]}: entry {raw['__key__']!r} where sample {key!r} should be; "
                "the cache was built from other shards: rebuild it with fvl features build"
            )
        features = decode_entry(raw)
        if self.select is None or not features:
            return features
        return list(self.select(torch.stack(features)).unbind(0))
