"""``fvl sweep``: a grid of runs, their evaluations and the executed comparison notebook."""

from __future__ import annotations

from dataclasses import dataclass, field

from fvl.cli.args import POSITIONAL as _POS


@dataclass
class SweepArgs:
    """Run a grid of experiments declared in a sweep YAML, reporting failures and going on.

    sweep: sweep YAML, e.g. experiments/sweeps/fusion.yaml.
    overrides: dot-list overrides applied to every run.
    parallel: grid points trained side by side, each in a worker process (0: the sweep YAML's parallel).
    no_notebook: skip the sweep's notebook (its ``notebook:``) at the end.
    with_optional: add the sweep's ``optional`` values to its grid (the fusion sweep's Florence-2 + SigLIP).
    """

    sweep: str = field(metadata=_POS)
    overrides: list[str] = field(default_factory=list, metadata=_POS)
    parallel: int = 0
    no_notebook: bool = False
    with_optional: bool = False


def sweep(args: SweepArgs) -> int:
    from fvl.sweep.runner import load_sweep, print_sweep_summary, report, run_sweep

    spec = load_sweep(args.sweep, args.with_optional)
    runs = run_sweep(
        args.sweep, args.overrides, parallel=args.parallel or None, with_optional=args.with_optional
    )
    print_sweep_summary(spec.name, runs)
    ok = all(r.status == "ok" for r in runs)
    if spec.notebook is not None and not args.no_notebook and runs:
        try:
            print(f"report: {report(spec, runs[0].sweep_id, args.overrides)}")
        except Exception as e:  # noqa: BLE001 - the runs are done and kept; say what failed
            print(
                f"report: {spec.notebook.name} failed on launch {runs[0].sweep_id}: {type(e).__name__}: {e}"
            )
            ok = False
    return 0 if ok else 1
