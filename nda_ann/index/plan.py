"""The build plan of one scale: class specs, shard ranges, batch size; deterministic and JSON-able.

The plan is what an interrupted build compares against to decide whether it may resume.
"""
from __future__ import annotations

import math
from typing import Any

from ..scoring.scales import Scale
from .factory import ClassSpec, class_specs, pixel_codes
from .layout_ids import INTERIOR_RULE, STRIDE_RULE, ClassLayout, class_layouts
from .manifest import scale_dir

INDEX_SHARE = 3        # a shard's sub-indexes take at most budget / 3 (Flat grows by doubling)
BATCH_SHARE = 16       # one batch of patch vectors takes at most budget / 16


def batch_images(budget: int, resolution: int, channels: int, scales: list[Scale]) -> int:
    """Images per streamed batch: their patch vectors (about twice, with copies) fit in budget / 16."""
    per_image = max(s.grid(resolution) ** 2 * s.dim(channels) * 4 * 2 for s in scales)
    return int(min(4096, max(8, budget // BATCH_SHARE // per_image)))


def shard_ranges(count: int, images_per_shard: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) image ranges of at most ``images_per_shard`` images."""
    return [(lo, min(lo + images_per_shard, count)) for lo in range(0, count, images_per_shard)] or [(0, 0)]


def plan_scale(scale: Scale, count: int, resolution: int, channels: int, stride: int, factory: str,
               budget: int, classes: str = "all") -> dict[str, Any]:
    """The plan entry of one scale (the manifest's scale entry, less shards' results)."""
    scale.check_fits(resolution)
    layouts = class_layouts(resolution, scale, stride, classes)
    d = scale.dim(channels)
    specs = class_specs([max(1, count * c.width) for c in layouts], d, budget, factory, pixel_grid=scale.factor == 1)
    per_image = sum(c.width * s.code_bytes for c, s in zip(layouts, specs))
    nshards = max(1, math.ceil(count * per_image / (budget / INDEX_SHARE)))
    per_shard = max(1, math.ceil(count / nshards))
    return {
        "scale": str(scale), "patch": scale.patch, "factor": scale.factor, "dim": d,
        "grid": scale.grid(resolution), "candidate_stride": stride, "stride_rule": STRIDE_RULE,
        **({"index_classes": classes} if classes != "all" else {}),
        "dir": scale_dir(scale), "images_per_shard": per_shard,
        "bytes_per_image": per_image,
        "classes": [class_entry(c, s) for c, s in zip(layouts, specs)],
    }


def class_entry(c: ClassLayout, spec: ClassSpec) -> dict[str, Any]:
    return {"index": c.index, "key": [list(k) for k in c.key], "kind": c.kind,
            "positions": int(c.positions.size), "indexed": c.width, **spec.to_json()}


def specs_of(entry: dict[str, Any]) -> list[ClassSpec]:
    fields = ClassSpec.__dataclass_fields__
    return [ClassSpec.from_json({k: c[k] for k in fields}) for c in entry["classes"]]


def approximations(entry: dict[str, Any]) -> list[str]:
    """Every approximation of one scale, in words (docs/scores.md section 5: named, never silent)."""
    out = []
    if entry["candidate_stride"] > 1:
        out.append(f"candidate stride {entry['candidate_stride']}: {entry['stride_rule']}")
    if entry.get("index_classes", "all") == "interior":
        out.append(INTERIOR_RULE)
    empty = [c["index"] for c in entry["classes"] if c["indexed"] == 0]
    if empty and entry.get("index_classes", "all") == "all":
        out.append(f"layout classes {empty} keep no position on the stride grid: their queries retrieve nothing")
    by_tier: dict[str, list[int]] = {}
    for c in entry["classes"]:
        by_tier.setdefault(c["factory"], []).append(c["index"])
    for factory, idx in by_tier.items():
        spec = next(c for c in entry["classes"] if c["factory"] == factory)
        if spec["exact"]:
            continue
        what = [f"{len(idx)} class(es) use {factory}"]
        if spec["nlist"]:
            what.append(f"search probes nprobe={spec['nprobe']} of {spec['nlist']} lists by default (results approximate)")
        if pixel_codes(factory):
            what.append(f"lossless pixel codes ({spec['code_bytes']} bytes per vector vs {4 * entry['dim']} raw): distances exact to float rounding")
        elif factory.split(",")[-1] != "Flat":
            what.append(f"compressed codes ({spec['code_bytes']} bytes per vector vs {4 * entry['dim']} raw): distances approximate")
        if factory.split(",")[0].startswith(("OPQ", "PCA")):
            what.append("rotated/reduced before coding")
        out.append("; ".join(what))
    return out


def kind_factories(entry: dict[str, Any]) -> dict[str, list[str]]:
    """Factory strings used per class kind (interior / edge / corner)."""
    out: dict[str, list[str]] = {}
    for c in entry["classes"]:
        if c["factory"] not in out.setdefault(c["kind"], []):
            out[c["kind"]].append(c["factory"])
    return out
