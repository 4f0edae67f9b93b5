"""A readable summary of an index: what it holds, its sizes on disk, bytes per vector per scale."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import TRAINED_DIR
from .phases import human_bytes
from .search import PatchIndex


def scale_sizes(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Vectors, bytes on disk and bytes per vector of one scale, in total and per class kind."""
    kinds: dict[str, dict[str, int]] = {}
    for shard in entry["shards"]:
        for c, n in zip(entry["classes"], shard["ntotal"]):
            k = kinds.setdefault(c["kind"], {"vectors": 0, "bytes": 0, "classes": 0})
            k["vectors"] += n
            k["bytes"] += shard["files"][f"class-{c['index']:03d}.faiss"]
    for c in entry["classes"]:
        kinds.setdefault(c["kind"], {"vectors": 0, "bytes": 0, "classes": 0})["classes"] += 1
    templates = sum(entry["templates"].values())
    vectors = sum(k["vectors"] for k in kinds.values())
    data = sum(k["bytes"] for k in kinds.values())
    return {"vectors": vectors, "bytes": data + templates, "template_bytes": templates,
            "bytes_per_vector": data / vectors if vectors else 0.0, "kinds": kinds}


def index_summary(index: PatchIndex) -> str:
    """The text `nda-ann info` prints."""
    m = index.manifest
    lines = [f"index      {index.path}",
             f"format     {m['format']} v{m['schema_version']}, id {m.get('index_id', '?')}",
             f"built      {m['created']} on {m['device']} in {m.get('build_seconds', '?')} s (updated {m['updated']})",
             f"versions   " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"images     {m['count']:,} of {m['resolution']}x{m['resolution']}x{m['channels']}",
             "stores"]
    for s, p in zip(m["stores"], index.store_paths()):
        lines.append(f"  [{s['offset']:,}, {s['offset'] + s['count']:,})  {p}  (fingerprint {s['fingerprint'][:12]})")
    total = 0
    for entry in m["scales"]:
        sz = scale_sizes(index.path, entry)
        total += sz["bytes"]
        lines.append(f"scale {entry['scale']}: dim {entry['dim']}, grid {entry['grid']}x{entry['grid']}, "
                     f"candidate stride {entry['candidate_stride']}, {len(entry['classes'])} layout classes, "
                     f"{len(entry['shards'])} shard(s); {sz['vectors']:,} vectors, {human_bytes(sz['bytes'])} on disk, "
                     f"{sz['bytes_per_vector']:.1f} bytes/vector")
        for kind, k in sz["kinds"].items():
            facs = ", ".join(entry["factories"].get(kind, []))
            per = k["bytes"] / k["vectors"] if k["vectors"] else 0.0
            lines.append(f"  {kind:<8} {k['classes']:>4} classes {k['vectors']:>14,} vectors  {human_bytes(k['bytes']):>10}  {per:7.1f} B/vec  {facs}")
        ivf: dict[tuple, int] = {}
        for c in entry["classes"]:
            if c["nlist"]:
                key = (c["kind"], c["factory"], c["nprobe"], c["train_size"])
                ivf[key] = ivf.get(key, 0) + 1
        for (kind, factory, nprobe, train), n in ivf.items():
            lines.append(f"  {n} {kind} class(es) {factory}: nprobe {nprobe}, trained on {train:,} vectors each")
        if sz["template_bytes"]:
            lines.append(f"  trained templates ({TRAINED_DIR}/): {human_bytes(sz['template_bytes'])}")
        for a in entry["approximations"] or ["exact: every class is a Flat index over every position"]:
            lines.append(f"  approximation: {a}")
    thumbs = m.get("thumbnails")
    if thumbs:
        total += thumbs["bytes"]
        lines.append(f"thumbnails {thumbs['count']:,} of {thumbs['side']}x{thumbs['side']} (float16), {human_bytes(thumbs['bytes'])}: {thumbs['file']}")
    lines.append(f"total      {human_bytes(total)} on disk")
    return "\n".join(lines)
