"""Training of each layout class's template on a deterministic random sample of store images."""
from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..scoring.patches import extract_patches
from ..scoring.scales import Scale
from ..corpus.store import Store
from .factory import ClassSpec, check_pixel_grid, make_index, pixel_codes, set_pixel_ranges
from .gpu import gpu_clustering
from .layout_ids import ClassLayout
from .phases import RATES, log, phase, ticking


def write_index_atomic(index: faiss.Index, path: Path) -> int:
    """faiss.write_index to ``path`` via a temporary name and os.replace; returns the size in bytes.

    FAISS reports a failed write (disk full, no permission) as a RuntimeError; it is raised as the
    OSError it was (errno from FAISS's message, else EIO), naming the file.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        faiss.write_index(index, str(tmp))
    except RuntimeError as err:
        tmp.unlink(missing_ok=True)
        raise faiss_os_error(err, tmp) from err
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def faiss_os_error(err: RuntimeError, path: Path) -> OSError:
    """The OSError behind a FAISS I/O RuntimeError: FAISS quotes strerror, e.g. '(No space left on device)'."""
    text = str(err)
    code = next((c for c in sorted(errno.errorcode) if os.strerror(c) in text), errno.EIO)
    return OSError(code, os.strerror(code), str(path))


def sample_vectors(store: Store, scale: Scale, classes: Sequence[ClassLayout], sizes: Sequence[int],
                   seed: int, batch_size: int, progress: bool = True) -> list[np.ndarray]:
    """Training vectors of each class: (sizes[i], D) float32, drawn from random images of ``store``.

    Class i takes all its indexed positions from the first ceil(sizes[i] / width) images of one
    seeded permutation of the store, then keeps a seeded random subset of sizes[i] rows.
    """
    rng = np.random.default_rng([seed, scale.patch, scale.factor])
    perm = rng.permutation(len(store))
    rank = np.empty(len(store), dtype=np.int64)
    rank[perm] = np.arange(len(store))
    need = [min(len(store), math.ceil(s / c.width)) for c, s in zip(classes, sizes)]
    rows = np.sort(perm[: max(need)])
    parts: list[list[np.ndarray]] = [[] for _ in classes]
    bar = tqdm(total=len(rows), desc=f"sample {scale}", unit="img", disable=not progress, leave=False)
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo: lo + batch_size]
        patches = extract_patches(store.tensor(chunk), scale).numpy()
        for i, c in enumerate(classes):
            keep = rank[chunk] < need[i]
            if keep.any():
                parts[i].append(patches[keep][:, c.indexed].reshape(-1, patches.shape[-1]))
        bar.update(len(chunk))
    bar.close()
    out = []
    for i, size in enumerate(sizes):
        x = np.concatenate(parts[i]) if parts[i] else np.zeros((0, scale.dim(store.channels)), np.float32)
        if len(x) > size:
            x = x[np.sort(rng.choice(len(x), size, replace=False))]
        out.append(np.ascontiguousarray(x, dtype=np.float32))
    return out


def kmeans_seconds(spec: ClassSpec, d: int) -> float:
    """A rough a-priori training time: 10 k-means iterations (FAISS's IVF default) over the sample."""
    return 2.0 * spec.train_size * max(spec.nlist, 1) * d * 10 / RATES["kmeans_flops"]


def train_templates(store: Store, scale: Scale, classes: Sequence[ClassLayout], specs: Sequence[ClassSpec],
                    out_dir: Path, seed: int, batch_size: int, budget: int, use_gpu: bool,
                    progress: bool = True) -> dict[str, int]:
    """Write the empty trained index of every class that needs training to ``out_dir/class-XXX.faiss``.

    Returns {file name: size}. Untrained kinds (Flat) need no template: shards make them from the
    factory string. Templates already present (an interrupted build) are kept. Classes are sampled
    in groups whose training vectors fit in a quarter of the memory budget.
    """
    from .manifest import class_file

    out_dir.mkdir(parents=True, exist_ok=True)
    d = scale.dim(store.channels)
    todo = [i for i, c in enumerate(classes) if not (out_dir / class_file(c.index)).exists()]
    trained = [i for i in todo if specs[i].train_size > 0]
    groups: list[list[int]] = []
    for i in trained:
        if groups and sum(specs[j].train_size for j in groups[-1] + [i]) * 4 * d <= budget // 4:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        sizes = [specs[i].train_size for i in group]
        est = sum(kmeans_seconds(specs[i], d) for i in group)
        with phase(f"scale {scale}: train {len(group)} class(es) on {sum(sizes):,} vectors "
                   f"({', '.join(sorted({specs[i].factory for i in group}))})",
                   est_seconds=est, est_bytes=2 * sum(sizes) * 4 * d):
            samples = sample_vectors(store, scale, [classes[i] for i in group], sizes, seed, batch_size, progress)
            with ticking(f"train {scale}", est, progress) as bar:
                _train_group(scale, classes, specs, group, samples, out_dir, d, use_gpu, bar)
    return {class_file(c.index): (out_dir / class_file(c.index)).stat().st_size
            for c, spec in zip(classes, specs) if spec.train_size > 0}


def _train_group(scale: Scale, classes: Sequence[ClassLayout], specs: Sequence[ClassSpec], group: list[int],
                 samples: list[np.ndarray], out_dir: Path, d: int, use_gpu: bool, bar: tqdm) -> None:
    """Train the classes ``group`` on their (n_i, d) samples; write each empty trained index to ``out_dir``."""
    from .manifest import class_file

    for k, (i, x) in enumerate(zip(group, samples)):
        bar.set_postfix_str(f"class {k + 1}/{len(group)}, {len(x):,} vectors", refresh=False)
        index = make_index(specs[i].factory, d)
        if use_gpu:
            gpu_clustering(index)
        index.train(x)
        if pixel_codes(specs[i].factory):
            set_pixel_ranges(index, check_pixel_grid(x, f"scale {scale} class {classes[i].index} training sample"))
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.clustering_index = None
        write_index_atomic(index, out_dir / class_file(classes[i].index))
        log.debug("trained class %d (%s) on %d vectors", classes[i].index, specs[i].factory, len(x))
