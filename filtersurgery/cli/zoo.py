"""``filtersurgery inspect`` and ``filtersurgery zoo``: trace models, print maps, verify them
(the numerical check of a map is :func:`filtersurgery.tracing.verify.verify`; ``zoo --verify``
runs it on every model).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from filtersurgery.models.factory import SOURCES, build_model, list_cnns, parse_spec
from filtersurgery.tracing.probe import example_input
from filtersurgery.tracing.scaling_map import ScalingMap, format_coverage, is_structural
from filtersurgery.tracing.tracer import trace
from filtersurgery.tracing.verify import verify

__all__ = ["inspect_model", "add_parsers"]

COVERAGE_TARGET = 0.98


# ---------------------------------------------------------------------- inspect
def _input_tensor(model: nn.Module, input_size: Optional[Sequence[int]]):
    if input_size is None:
        return None
    if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
        raise ValueError(f"input_size (--input-size): expected three positive integers C H W, got {list(input_size)}")
    # the global RNG, as the tracer's own default input: `zoo` builds the next model from it
    return example_input(model, input_size, generator=None)


def inspect_model(spec: str, input_size: Optional[Sequence[int]] = None, meta: bool = False) -> Tuple[ScalingMap, str, str]:
    """Build ``spec`` (random weights) and trace it: ``(sm, source, name)``.

    With ``meta`` the model is built on the meta device when possible (no weight init; the
    map only depends on the structure), which makes ``zoo`` fast on huge models.
    """
    source, name = parse_spec(spec)
    model = None
    if meta and input_size is None:
        try:
            with torch.device("meta"):
                model, source = build_model(spec)
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
            model = None
    if model is None:
        model, source = build_model(spec)
    try:
        sm = trace(model, _input_tensor(model, input_size))
    except ValueError as e:  # the tracer names its own argument; here the size came from input_size
        msg = str(e)
        if input_size is not None and msg.startswith("example_inputs:"):
            raise ValueError("input_size (--input-size):" + msg[len("example_inputs:"):]) from None
        raise
    return sm, source, name


def _rounded(coverage: Optional[float]) -> Optional[float]:
    """Coverage for JSON: 6 decimals, or None (``null``: nothing mappable)."""
    return None if coverage is None else round(float(coverage), 6)


def _inspect_json(sm: ScalingMap, source: str, name: str) -> dict:
    """The ``inspect --json`` object (schema in docs/tracer.md)."""
    return {
        "model": name,
        "source": source,
        "input_size": [int(v) for v in sm.input_size] if sm.input_size else None,
        "trace_seconds": round(float(sm.trace_seconds or 0.0), 4),
        "coverage": _rounded(sm.coverage),
        "totals": {"convs": len(sm), "mapped": len(sm.mapped), "unscaled": len(sm.unscaled),
                   "scaling_factors": int(sm.factors.numel)},
        "convs": sm.to_json(),
    }


def _table(sm: ScalingMap) -> str:
    rows = [("conv", "out", "groups", "scaled by (norm@offset) / reason")]
    frozen = set(sm.frozen_norms)
    for e in sm:
        what = ", ".join(
            f"{r.norm}@{r.offset}" + (f"[{r.first}:{r.first + r.count}]" if r.count is not None else "")
            + (" (frozen)" if r.norm in frozen else "") for r in e.scaled_by
        ) if e.mapped else f"- {e.reason}"
        rows.append((e.name, str(e.out_channels), str(e.groups), what))
    w0 = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>5}  {c:>6}  {d}" for a, b, c, d in rows)


def _coverage_words(coverage: Optional[float]) -> str:
    """``"97.5%"``, or ``"n/a (nothing mappable: no conv has an affine norm downstream)"``."""
    if coverage is None:
        return "n/a (nothing mappable: no conv has an affine norm downstream)"
    return format_coverage(coverage, ".1%")


def _frozen_note(sm: ScalingMap) -> str:
    """`` (N frozen)`` when some scaling factors are frozen norms' buffers, else empty."""
    n = sm.factors.n_frozen
    return f" ({n} frozen: filtersurgery.unfreeze_norms makes them trainable)" if n else ""


def cmd_inspect(args: argparse.Namespace) -> int:
    """``filtersurgery inspect MODEL``: print the scaling map of one model (table or ``--json``)."""
    sm, source, name = inspect_model(args.spec, args.input_size)
    if args.json:
        print(json.dumps(_inspect_json(sm, source, name)))
        return 0
    print(_table(sm))
    print(
        f"\n{source}:{name}: {len(sm)} convs, {len(sm.mapped)} mapped, {len(sm.unscaled)} unscaled, "
        f"{sm.factors.numel} scaling factors{_frozen_note(sm)}, coverage {_coverage_words(sm.coverage)}, traced in {sm.trace_seconds:.2f}s "
        f"(input {tuple(sm.input_size) if sm.input_size else '?'})"
    )
    return 0


# -------------------------------------------------------------------------- zoo
def _zoo_names(source: str, patterns: Sequence[str]) -> List[str]:
    names = list_cnns(source)
    globs = [g.strip() for p in patterns for g in p.split(",") if g.strip()]
    if globs:
        names = [n for n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
    return names


def _zoo_one(source: str, name: str, input_size, do_verify: bool, filters_per_conv: int) -> dict:
    row = {"model": name, "source": source, "trace_seconds": None, "coverage": None, "convs": 0, "mapped": 0,
           "unscaled": 0, "tracer_misses": 0, "reasons": {}, "error": None, "verify": None}
    try:
        sm, _, _ = inspect_model(f"{source}:{name}", input_size, meta=not do_verify)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError, IndexError, KeyError, AssertionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row["error"] = f"{type(e).__name__}: {msg}"[:300]
        return row
    reasons = Counter(r.split(":")[0] for r in sm.unscaled.values())
    row.update(
        trace_seconds=round(float(sm.trace_seconds), 4), coverage=_rounded(sm.coverage), convs=len(sm),
        mapped=len(sm.mapped), unscaled=len(sm.unscaled), reasons=dict(reasons),
        tracer_misses=sum(1 for r in sm.unscaled.values() if not is_structural(r)),
    )
    if do_verify:
        try:
            v = verify(sm, input_size, filters_per_conv=filters_per_conv)
            row["verify"] = {"filters": v.filters, "checks": v.checks, "mismappings": v.mismappings, "unverified": v.unverified}
        except (RuntimeError, ValueError) as e:
            row["error"] = f"verify: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return row


def _zoo_line(row: dict) -> str:
    head = f"{row['source']}:{row['model']}"
    if row["error"] and row["trace_seconds"] is None:
        return f"{head:<44} ERROR {row['error']}"
    cov = "    n/a" if row["coverage"] is None else f"{100 * row['coverage']:6.2f}%"
    line = (
        f"{head:<44} convs {row['convs']:4d}  mapped {row['mapped']:4d}  unscaled {row['unscaled']:3d}  "
        f"coverage {cov}  trace {row['trace_seconds']:.2f}s"
    )
    v = row["verify"]
    if v is not None:
        line += f"  verify {v['filters']} filters: {len(v['mismappings'])} mis-mappings"
        if v["unverified"]:
            line += f" ({len(v['unverified'])} convs not run in eval)"
    if row["error"]:
        line += f"  ERROR {row['error']}"
    return line


def _totals(rows: List[dict], do_verify: bool) -> dict:
    ok = [r for r in rows if r["trace_seconds"] is not None]  # traced (verify may still have failed)
    cov = [r["coverage"] for r in ok if r["coverage"] is not None]
    t = {
        "models": len(rows),
        "traced": len(ok),
        "coverage_na": sum(1 for r in ok if r["coverage"] is None),
        "errors": sum(1 for r in rows if r["error"]),
        "convs": sum(r["convs"] for r in ok),
        "mapped": sum(r["mapped"] for r in ok),
        "tracer_misses": sum(r["tracer_misses"] for r in ok),
        "mean_coverage": round(sum(cov) / len(cov), 6) if cov else None,
        "min_coverage": round(min(cov), 6) if cov else None,
        "below_target": sorted(r["model"] for r in ok if r["coverage"] is not None and r["coverage"] < COVERAGE_TARGET),
        "max_trace_seconds": round(max((r["trace_seconds"] for r in ok), default=0.0), 4),
    }
    if do_verify:
        t["verified_filters"] = sum(r["verify"]["filters"] for r in ok if r["verify"])
        t["mismappings"] = sum(len(r["verify"]["mismappings"]) for r in ok if r["verify"])
    return t


def cmd_zoo(args: argparse.Namespace) -> int:
    """``filtersurgery zoo``: trace (and ``--verify``) every CNN of a source; exit 1 on errors or mis-mappings."""
    names = _zoo_names(args.source, args.filter or [])
    if not names:
        raise ValueError(f"--filter: no {args.source} CNN matches {args.filter}")
    rows = []
    for name in names:
        row = _zoo_one(args.source, name, args.input_size, args.verify, args.filters_per_conv)
        rows.append(row)
        if not args.json:
            print(_zoo_line(row), flush=True)
            if row["verify"]:
                for m in row["verify"]["mismappings"][:20]:
                    print(f"    mis-mapping: {m}")
    totals = _totals(rows, args.verify)
    if args.json:
        print(json.dumps({"source": args.source, "filter": args.filter, "verify": bool(args.verify), "models": rows, "totals": totals}))
    else:
        line = (
            f"\ntotal: {totals['models']} models, {totals['traced']} traced, {totals['errors']} errors, "
            f"{totals['convs']} convs, {totals['mapped']} mapped, {totals['tracer_misses']} tracer misses"
        )
        if totals["mean_coverage"] is not None:
            line += f", coverage mean {100 * totals['mean_coverage']:.2f}% min {100 * totals['min_coverage']:.2f}%"
        if totals["coverage_na"]:
            line += f" ({totals['coverage_na']} with coverage n/a: nothing mappable)"
        if args.verify:
            line += f", {totals['verified_filters']} filters verified, {totals['mismappings']} mis-mappings"
        print(line)
        if totals["below_target"]:
            print(f"below {COVERAGE_TARGET:.0%} coverage: {', '.join(totals['below_target'])}")
    failed = totals["errors"] or (args.verify and totals["mismappings"])
    return 1 if failed else 0


# -------------------------------------------------------------------------- CLI
def add_parsers(sub) -> None:
    """Register the ``inspect`` and ``zoo`` sub-commands (see :mod:`filtersurgery.cli`)."""
    p = sub.add_parser("inspect", help="trace one model: every conv -> the norm weight(s) scaling its filters")
    p.add_argument("spec", metavar="MODEL",
                   help="timm:NAME, torchvision:NAME, cifar:resnetDEPTH or a bare timm NAME (random weights)")
    p.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"), default=None,
                   help="example input size (default: the model's own, e.g. timm pretrained_cfg input_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema in docs/tracer.md)")
    p.set_defaults(func=cmd_inspect)

    z = sub.add_parser("zoo", help="trace every CNN of a model source; per-model line plus totals")
    z.add_argument("--source", choices=SOURCES, default="timm", help="model zoo to list (default %(default)s)")
    z.add_argument("--filter", action="append", metavar="GLOB",
                   help="only model names matching GLOB (repeatable; comma-separated globs allowed)")
    z.add_argument("--verify", action="store_true",
                   help="perturb mapped filters and check that exactly the mapped norm channels change")
    z.add_argument("--filters-per-conv", type=int, default=3, help="filters probed per conv by --verify (default 3)")
    z.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"), default=None,
                   help="example input size for every model (default: each model's own)")
    z.add_argument("--json", action="store_true", help="print one JSON object with per-model rows and totals")
    z.set_defaults(func=cmd_zoo)
