"""One shard: the images [first, first + n) of one scale, streamed into a sub-index per layout class."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..atomic import fsync_dir, write_json_atomic
from ..errors import IndexError_
from ..scoring.patches import extract_patches
from ..scoring.scales import Scale
from ..corpus.store import Store
from .factory import ClassSpec, check_pixel_grid, make_index, pixel_codes
from .gpu import to_gpu
from .layout_ids import ClassLayout
from .manifest import SHARD_FILE, class_file
from .train import write_index_atomic


def read_done_shard(folder: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint of a finished shard folder if it matches ``expect`` and its files are sized right."""
    try:
        done = json.loads((folder / SHARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if any(done.get(k) != v for k, v in expect.items()):
        return None
    for name, size in done.get("files", {}).items():
        path = folder / name
        if not path.exists() or path.stat().st_size != size:
            return None
    return done


def template_bytes(template_dir: Path, classes: Sequence[ClassLayout], specs: Sequence[ClassSpec]) -> dict[int, bytes]:
    """{class index: file bytes} of every trained class template in ``template_dir`` (for ``build_shard``)."""
    return {c.index: (template_dir / class_file(c.index)).read_bytes() for c, spec in zip(classes, specs) if spec.train_size}


def build_shard(store: Store, rows: tuple[int, int], first_image: int, scale: Scale,
                classes: Sequence[ClassLayout], specs: Sequence[ClassSpec], template_dir: Path, folder: Path, batch_size: int,
                use_gpu: bool, expect: dict[str, Any], progress: bool = True,
                templates: Mapping[int, bytes] | None = None) -> dict[str, Any]:
    """Add the patch vectors of store rows [lo, hi) (global ids from ``first_image``) to a copy of each
    class template, then publish ``folder`` atomically with its checkpoint; returns the checkpoint.

    ``templates`` ({class index: serialized empty trained index}, as ``template_bytes`` reads them)
    replaces reading ``template_dir``: a Ray worker gets them through the object store.
    Memory: the shard's sub-indexes plus one batch of patches, (batch, grid^2, D) float32.
    """
    lo, hi = rows
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    indexes = []
    for c, spec in zip(classes, specs):
        if spec.train_size == 0:
            index = make_index(spec.factory, scale.dim(store.channels))
        elif templates is not None:
            index = faiss.deserialize_index(np.frombuffer(templates[c.index], dtype=np.uint8))
        else:
            index = faiss.read_index(str(template_dir / class_file(c.index)))
        if index.ntotal:
            raise IndexError_(template_dir / class_file(c.index), "template is not empty; rebuild the index")
        # pixel codes are added on the CPU: their losslessness rests on the CPU encoder's truncation
        indexes.append(to_gpu(index) if use_gpu and not pixel_codes(spec.factory) else (index, False))
    bar = tqdm(total=hi - lo, desc=f"add {scale} [{first_image}, {first_image + hi - lo})", unit="img",
               disable=not progress, leave=False)
    for b, (_, batch) in enumerate(store.batches(batch_size, lo, hi)):
        patches = extract_patches(batch, scale).numpy()
        for c, spec, (index, _) in zip(classes, specs, indexes):
            x = np.ascontiguousarray(patches[:, c.indexed].reshape(-1, patches.shape[-1]))
            if b == 0 and pixel_codes(spec.factory):  # lossless only on pixel values: checked on each shard's first batch
                check_pixel_grid(x, f"{store.path}: scale {scale} class {c.index}")
            index.add(x)
        bar.update(len(batch))
    bar.close()
    files, ntotal = {}, []
    for c, (index, on_gpu) in zip(classes, indexes):
        cpu = faiss.index_gpu_to_cpu(index) if on_gpu else index
        if cpu.ntotal != (hi - lo) * c.width:
            raise IndexError_(folder, f"class {c.index} holds {cpu.ntotal} vectors, expected {(hi - lo) * c.width}")
        files[class_file(c.index)] = write_index_atomic(cpu, tmp / class_file(c.index))
        ntotal.append(int(cpu.ntotal))
    done = dict(expect, ntotal=ntotal, files=files)
    write_json_atomic(tmp / SHARD_FILE, done)
    fsync_dir(tmp)
    if folder.exists():  # a stale shard from another plan; the caller checked it does not match
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    fsync_dir(folder.parent)
    return done
