"""Strict state-dict key mapping: every source tensor used exactly once, every target tensor filled.

A conversion is a list of ``Rule``s (a regex over source keys -> a target key, or a drop with its reason)
applied to a source state dict against the target model's own state dict (names, shapes, and which names
share one tensor). ``convert`` raises one ``KeyMappingError`` that lists every problem at once: source keys
no rule covers (leftover), target keys nothing filled (missing), shapes that differ, two sources for one
target, and tied target keys whose sources differ. Silence would build a model with random tensors in it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# (source tensor, the target's own tensor) -> the tensor to store: a transpose, rows added, a check
Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SHOWN = 20  # keys listed per problem in an error (then a count)


class KeyMappingError(ValueError):
    """A conversion that would leave a source tensor unused or a target tensor unfilled."""


@dataclass(frozen=True)
class Rule:
    """``pattern`` (a regex, matched against the whole source key) -> ``target`` (a ``re`` replacement
    template such as ``model.\\1``, or a function of the match); ``target=None`` drops the tensor, with
    ``why`` saying why that is right. ``transform`` adapts the tensor to the target (a transpose); on a
    dropped tensor it is a check that raises if dropping would lose something."""

    pattern: str
    target: str | Callable[[re.Match[str]], str] | None
    transform: Transform | None = None
    why: str = ""

    def __post_init__(self) -> None:
        if self.target is None and not self.why:
            raise ValueError(f"rule {self.pattern!r} drops tensors: say why")


@dataclass
class Report:
    """What a conversion did, key by key (``used``: source -> target; ``dropped``: source -> reason;
    ``tied``: target filled from the tensor it shares; ``kept``: target keeping its own value, with why)."""

    used: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for why in self.dropped.values():
            reasons[why] = reasons.get(why, 0) + 1
        parts = [f"{len(self.used)} tensors mapped"]
        parts += [f"{n} dropped ({why})" for why, n in reasons.items()]
        if self.tied:
            parts.append(f"{len(self.tied)} filled from their tied tensor")
        parts += [f"{k} kept ({why})" for k, why in self.kept.items()]
        return "; ".join(parts)


def tie_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names that share one tensor in a model's ``state_dict()`` (tied embeddings), in state-dict order."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta" or not tensor.numel():
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _listing(title: str, items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:SHOWN]) + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")
    return f"{title} ({len(items)}): {shown}"


def convert(
    source: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    target: Mapping[str, torch.Tensor],
    what: str,
    keep: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], Report]:
    """The tensors of ``target``'s keys, taken from ``source`` by ``rules`` (first match wins).

    ``target`` is the target model's ``state_dict()``: its keys and shapes are the contract, and names that
    share a tensor there (``tie_groups``) are filled from whichever of them the source provides (several
    must be equal). ``keep`` names target keys that may keep the target's own value when the source lacks
    them, with the reason (a constant buffer computed at construction). ``what`` names the conversion in
    errors. Raises ``KeyMappingError`` listing all leftover, missing, misshapen and conflicting keys."""
    keep = dict(keep or {})
    compiled = [(re.compile(r.pattern), r) for r in rules]
    out: dict[str, torch.Tensor] = {}
    report = Report()
    leftover, unknown, shapes, twice = [], [], [], []
    for key, tensor in source.items():
        match, rule = next(((m, r) for p, r in compiled if (m := p.fullmatch(key))), (None, None))
        if rule is None:
            leftover.append(key)
            continue
        if rule.target is None:
            if rule.transform is not None:
                rule.transform(tensor, tensor)  # a check that dropping loses nothing (raises if it would)
            report.dropped[key] = rule.why
            continue
        name = rule.target(match) if callable(rule.target) else match.expand(rule.target)
        if name not in target:
            unknown.append(f"{key} -> {name}")
            continue
        if name in out:
            twice.append(f"{name} <- {_source_of(report, name)} and {key}")
            continue
        value = rule.transform(tensor, target[name]) if rule.transform else tensor
        if tuple(value.shape) != tuple(target[name].shape):
            shapes.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target[name].shape)}")
            continue
        out[name] = value
        report.used[key] = name

    conflicts = []
    for group in tie_groups(target):
        filled = [n for n in group if n in out]
        if not filled:
            continue
        first = out[filled[0]]
        different = [n for n in filled[1:] if not torch.equal(out[n], first)]
        if different:
            conflicts.append(f"{filled[0]} vs {', '.join(different)}")
        for name in group:
            if name not in out:
                out[name] = first
                report.tied[name] = filled[0]

    missing = []
    for name in target:
        if name in out:
            continue
        if name in keep:
            out[name] = target[name]
            report.kept[name] = keep[name]
        else:
            missing.append(name)

    problems = [
        _listing("source keys no rule maps (leftover)", leftover) if leftover else "",
        _listing("target keys nothing fills (missing)", missing) if missing else "",
        _listing("rules giving keys the target lacks", unknown) if unknown else "",
        _listing("shapes that differ", shapes) if shapes else "",
        _listing("target keys filled twice", twice) if twice else "",
        _listing("tied target keys with different sources", conflicts) if conflicts else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise KeyMappingError(f"{what}: " + "; ".join(problems))
    return out, report


def _source_of(report: Report, name: str) -> str:
    return next((k for k, v in report.used.items() if v == name), "?")


def grow_rows(tensor: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A vocabulary table grown to the target's rows: the new rows are the mean of the existing ones (as
    LLaVA and transformers' Florence-2 conversion fill added tokens), so no new token stands out."""
    if tensor.shape[1:] != own.shape[1:] or tensor.shape[0] > own.shape[0]:
        return tensor  # ``convert`` reports the shape mismatch
    extra = own.shape[0] - tensor.shape[0]
    if not extra:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, *tensor.shape[1:])], dim=0)


def transpose(tensor: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    return tensor.t().contiguous()
