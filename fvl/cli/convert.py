"""``fvl import ...`` and ``fvl export``: checkpoints from other layouts made fvl's, and fvl's made a folder
that transformers loads (the conversions live in ``fvl.convert``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fvl.cli.args import POSITIONAL as _POS


@dataclass
class ImportFlorence2Args:
    """Convert a Florence-2 folder in Microsoft's remote-code layout (microsoft/Florence-2-*) into
    transformers' native layout (florence-community/Florence-2-*), which model.vision.path loads; a native
    folder is copied through. No code from the folder runs.

    src: the Florence-2 folder (config.json, model.safetensors or pytorch_model.bin, tokenizer files).
    out: the folder to write (new or empty).
    """

    src: str = field(metadata=_POS)
    out: str = field(metadata=_POS)


def import_florence2(args: ImportFlorence2Args) -> int:
    from fvl.convert import import_florence2 as run

    result = run(args.src, args.out)
    if result.layout == "native":
        print(f"{args.src} is in transformers' native Florence-2 layout already: copied to {result.out}")
        return 0
    assert result.report is not None and result.vocab is not None
    print(f"converted {args.src} (remote-code layout) to {result.out}: {result.report.summary()}")
    print(
        f"tokenizer: {result.added_tokens} tokens added; vocabulary {result.vocab[0]} -> {result.vocab[1]} rows"
    )
    if result.ignored:
        print(f"config keys without effect on the architecture (not carried): {', '.join(result.ignored)}")
    print(f"use it with model.vision.init=pretrained model.vision.path={result.out}")
    return 0


@dataclass
class ImportFlorenceVLArgs:
    """Convert the authors' Florence-VL checkpoint (their LLaVA fork: model_type llava_phi or llava_llama,
    projector under model.mm_projector, Florence-2 in vision_tower/) into an fvl checkpoint for fvl eval,
    chat and export. No code from the folder runs.

    src: the Florence-VL folder (config.json with mm_* fields, weights, tokenizer, vision_tower/).
    out: the folder to write (new or empty): model.safetensors, llm_tokenizer/, florence2_tokenizer/ and
      fvl_import.json (what became of every key).
    vision_tower: the Florence-2 folder when it is neither SRC/vision_tower nor config.json's mm_vision_tower.
    """

    src: str = field(metadata=_POS)
    out: str = field(metadata=_POS)
    vision_tower: str | None = None


def import_florence_vl(args: ImportFlorenceVLArgs) -> int:
    from fvl.convert import import_florence_vl as run

    result = run(args.src, args.out, args.vision_tower)
    print(f"imported {args.src} as preset {result.preset}: {result.report.summary()}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"checkpoint: {result.checkpoint} (fvl eval / chat / export take it)")
    return 0


@dataclass
class ExportArgs:
    """Write a transformers-loadable folder from an fvl checkpoint.

    checkpoint: an fvl safetensors checkpoint, a run folder or latest.
    out: output folder.
    runs: where latest looks for runs.
    """

    checkpoint: str = field(metadata=_POS)
    out: str = field(metadata=_POS)
    runs: str = "runs"


def export(args: ExportArgs) -> int:
    from fvl.convert import export as export_model
    from fvl.models import load_for_inference

    out = export_model(load_for_inference(args.checkpoint, args.runs), args.out)
    print(
        f"exported to {out}: llm/ and vision/ load with transformers from_pretrained (vision/ with its "
        "AutoProcessor); fvl.models.load_exported loads all"
    )
    return 0


@dataclass
class ConsolidateArgs:
    """Write a sharded checkpoint (an FSDP run's ``last.ckpt/`` or ``best.ckpt/`` folder) as one safetensors file
    of the model, on one process.

    checkpoint: a sharded ``.ckpt`` folder, or a run folder (its best, else its last).
    out: the file to write (default: beside the folder, ``best.safetensors`` for ``best.ckpt/``).
    """

    checkpoint: str = field(metadata=_POS)
    out: str | None = None


def consolidate(args: ConsolidateArgs) -> int:
    from fvl.convert.consolidate import consolidate as consolidate_checkpoint

    print(f"wrote {consolidate_checkpoint(args.checkpoint, args.out)}")
    return 0
