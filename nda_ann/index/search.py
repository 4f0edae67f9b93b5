"""PatchIndex: open an index folder (memory-mapped) and search it under the layout rule."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import faiss
import numpy as np
import torch

from ..atomic import FolderIdentity, wait_for_folder
from ..errors import IndexError_, InputError
from ..scoring.scales import Scale, ScaleLike
from .factory import pixel_codes
from .layout_ids import ClassLayout
from .manifest import check_files, class_file, layouts_of, read_manifest, resolve_index_path

SKIP_TABLE = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
MMAP_FLAT = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
# IVF: zero-copy mapped array lists (IO_FLAG_MMAP_IFC) where FAISS has them; the older
# IO_FLAG_MMAP gives OnDiskInvertedLists, 1.5x (interior, 676 queries) to 2.5x (small classes)
# slower to search: measured at 5,000 images, k = 1,024 (BENCHMARKS.md "reading_attribute")
MMAP_IVF_LEGACY = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY | SKIP_TABLE
MMAP_IVF = MMAP_FLAT | SKIP_TABLE if hasattr(faiss, "IO_FLAG_MMAP_IFC") else MMAP_IVF_LEGACY
TORCH_FLAT_MIN_K = 64              # below it FAISS's own Flat search is as fast
TORCH_FLAT_MIN_QUERIES = 8         # below it too: 1 query, k = 1,024 over 5,000 vectors took 0.13 ms
                                   # in FAISS, 0.28 ms through torch (36 corner classes: 8.5 / 20.7 ms)
TORCH_FLAT_MAX_QUERIES = 4096      # above it (batches of ~6+ query images) FAISS's blocked search wins
TORCH_FLAT_BYTES = 256 << 20       # distance block of the torch Flat search
MAX_RESULT_BYTES = 2 << 30         # the (Q, L, k) results of one search call may take this much (FAISS's
                                   # own per-class copies come on top); default k = 1,024 needs 14 MB a query


def read_index(path: Path, factory: str, mmap: bool) -> faiss.Index:
    """Read one sub-index; memory-mapped where FAISS supports it (Flat codes, IVF array lists).

    Fast-scan PQ lists cannot be mapped and are read into RAM. IVF-PQ's precomputed table
    (nlist x M x 256 floats, 128 MiB at 4096 lists) is skipped: tables are computed per query.
    """
    index = None
    if mmap and not factory.split(",")[-1].endswith("fs"):
        for flags in ((MMAP_IVF, MMAP_IVF_LEGACY) if "IVF" in factory else (MMAP_FLAT,)):
            try:
                index = faiss.read_index(str(path), flags)
                break
            except RuntimeError:
                index = None
    if index is None:
        try:
            index = faiss.read_index(str(path), SKIP_TABLE)
        except RuntimeError as err:
            raise IndexError_(path, f"unreadable index file ({str(err).strip().splitlines()[-1][:160]}); rebuild the index") from err
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        faiss.downcast_index(ivf).use_precomputed_table = -1
    return index


class PatchIndex:
    """A built index: per scale, one FAISS sub-index per layout class and shard (loaded lazily).

    Not safe for concurrent searches from several threads (nprobe is set on the shared sub-indexes).
    Versions: ``add`` never changes a file the opened manifest names, so an open index keeps
    searching the version it opened; after a replacement (``build --overwrite``) a sub-index not yet
    loaded would come from the new folder, so loading one then raises IndexError_ instead.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], mmap: bool = True, identity: FolderIdentity | None = None,
                 shards: Mapping[str, Sequence[int]] | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self._identity = identity or FolderIdentity(self.path)  # the folder the manifest was read from
        self.mmap = mmap
        self.scales = [Scale(e["patch"], e["factor"]) for e in manifest["scales"]]
        self.resolution = int(manifest["resolution"])
        self.channels = int(manifest["channels"])
        self.count = int(manifest["count"])
        if shards is not None and set(shards) - {e["scale"] for e in manifest["scales"]}:
            raise InputError(None, f"no scale(s) {sorted(set(shards) - {e['scale'] for e in manifest['scales']})} in {self.path}")
        self._entries = {s: _only_shards(e, shards) for s, e in zip(self.scales, manifest["scales"])}
        self._layouts = {s: layouts_of(manifest, e) for s, e in zip(self.scales, manifest["scales"])}
        self._loaded: dict[tuple[Scale, int, int], faiss.Index] = {}
        self._norms: dict[tuple, torch.Tensor] = {}  # squared norms of Flat classes' vectors

    @classmethod
    def open(cls, path: str | Path, mmap: bool = True, shards: Mapping[str, Sequence[int]] | None = None) -> "PatchIndex":
        """Open and check an index folder (a bare name means indexes/<name>).

        ``shards`` ({scale name: shard ids}, e.g. {"7": [0, 1]}) restricts searches to those shards
        (a scale not named searches none): a Ray shard actor holds part of an index this way. Ids,
        ``count`` and the manifest stay those of the whole index.
        """
        path = resolve_index_path(path)
        for _ in range(3):  # replaced while being opened: open the new version
            wait_for_folder(path)
            try:
                identity: FolderIdentity | None = FolderIdentity(path)
            except OSError:
                identity = None  # absent: read_manifest says so clearly
            manifest = None
            try:
                manifest = read_manifest(path)
                check_files(path, manifest)
            except (IndexError_, OSError):
                if identity is not None and identity.replaced():
                    continue
                if _manifest_changed(path, manifest):  # an add published meanwhile
                    continue
                raise
            if identity is not None and not identity.replaced():
                return cls(path, manifest, mmap, identity, shards)
        raise IndexError_(path, "the index kept being replaced while it was opened; try again")

    def __repr__(self) -> str:
        return f"PatchIndex({str(self.path)!r}, images={self.count}, scales={[str(s) for s in self.scales]})"

    def thumbnails(self) -> np.ndarray | None:
        """(N, C * 8 * 8) float16 thumbnails stored with the index (memory-mapped), or None."""
        from .thumbs import open_thumbs

        return open_thumbs(self.path, self.manifest.get("thumbnails"))

    def store_paths(self) -> list[Path]:
        """The member stores in image-id order: the absolute path if it exists, else the relative one."""
        out = []
        for s in self.manifest["stores"]:
            absolute, relative = Path(s["path"]), (self.path / s["path_relative"]).resolve()
            out.append(absolute if absolute.exists() or not relative.exists() else relative)
        return out

    def locate(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global image ids -> (member store index, row in that store); -1 where the id is -1."""
        image = np.asarray(image, dtype=np.int64)
        offsets = np.array([s["offset"] for s in self.manifest["stores"]], dtype=np.int64)
        store = np.searchsorted(offsets, image, side="right") - 1
        row = image - offsets[np.clip(store, 0, None)]
        bad = image < 0
        return np.where(bad, -1, store), np.where(bad, -1, row)

    def layouts(self, scale: ScaleLike) -> list[ClassLayout]:
        """The layout classes of a scale, with their indexed positions."""
        return self._layouts[self._scale(scale)]

    def _scale(self, scale: ScaleLike) -> Scale:
        s = Scale.parse(scale)
        if s not in self._entries:
            raise InputError(None, f"scale {s} is not in the index {self.path} (it has {[str(x) for x in self.scales]})")
        return s

    def _index(self, scale: Scale, shard: dict[str, Any], c: ClassLayout) -> faiss.Index:
        key = (scale, shard["id"], c.index)
        if key not in self._loaded:
            entry = self._entries[scale]
            path = self.path / entry["dir"] / shard["dir"] / class_file(c.index)
            replaced = IndexError_(self.path, "the index was replaced (rebuilt with --overwrite) since it was opened; open it again")
            if self._identity.replaced():
                raise replaced
            try:
                index = read_index(path, entry["classes"][c.index]["factory"], self.mmap)
            except IndexError_ as err:
                raise (replaced if self._identity.replaced() else err) from err
            if self._identity.replaced():  # the file may have come from the new version
                raise replaced
            self._loaded[key] = index
        return self._loaded[key]

    @property
    def coarse_grid(self) -> bool:
        """Whether some scale indexes only part of the positions (candidate stride > 1 or interior only)."""
        return any(e["candidate_stride"] > 1 or e.get("index_classes", "all") != "all" for e in self.manifest["scales"])

    def distances_exact(self, scale: ScaleLike) -> bool:
        """Whether ``search`` returns true squared distances at ``scale`` (Flat, IVF-Flat or lossless
        pixel codes, no PCA/OPQ): only then may retrieved distances enter a softmax normaliser as
        they are."""
        entry = self._entries[self._scale(scale)]
        return all((c["factory"].split(",")[-1] == "Flat" or pixel_codes(c["factory"])) and not c["factory"].startswith(("PCA", "OPQ"))
                   for c in entry["classes"] if c["indexed"])

    def search(self, scale: ScaleLike, vectors: np.ndarray | torch.Tensor, k: int,
               nprobe: int | None = None) -> tuple[Any, Any, Any]:
        """k nearest same-layout candidates of every query patch.

        vectors: (L, D) or (Q, L, D) float32 query patch vectors at all L = grid^2 positions in
        row-major order (as ``extract_patches``), in the unscaled space (pass q / s).
        Returns (dist, image, position), each (..., L, k') with k' = min(k, ``max_k(scale)``), the
        most vectors any layout class holds: squared L2 distances (float32, approximate for
        compressed codes), global image ids and flat grid positions (int64); results missing in a
        smaller class are padded with inf / -1. numpy arrays, or torch tensors when ``vectors`` is a
        tensor. ``nprobe`` overrides each IVF class's default (manifest) number of probed lists.
        Raises InputError when the results would pass ``MAX_RESULT_BYTES`` (too many queries for k').
        """
        scale = self._scale(scale)
        entry = self._entries[scale]
        as_torch = isinstance(vectors, torch.Tensor)
        x = vectors.detach().to("cpu", torch.float32).numpy() if as_torch else np.asarray(vectors, dtype=np.float32)
        squeeze = x.ndim == 2
        x = x[None] if squeeze else x
        L, D = entry["grid"] ** 2, entry["dim"]
        if x.ndim != 3 or x.shape[1:] != (L, D):
            raise InputError(None, f"scale {scale}: expected query vectors (L, D) or (Q, L, D) with L = {L}, "
                                   f"D = {D}, got {tuple(np.shape(vectors))}")
        if int(k) != k or int(k) < 1:
            raise InputError(None, f"k must be a positive integer, got {k}")
        k = min(int(k), max(self.max_k(scale), 1))
        q_count = x.shape[0]
        check_result_size(q_count, L, k)
        dist = np.full((q_count, L, k), np.inf, dtype=np.float32)
        image = np.full((q_count, L, k), -1, dtype=np.int64)
        position = np.full((q_count, L, k), -1, dtype=np.int64)
        for c in self._layouts[scale]:
            if c.width == 0:  # a class with nothing indexed (candidate stride, --classes interior)
                continue
            queries = np.ascontiguousarray(x[:, c.positions].reshape(-1, D))
            d_c, i_c = self._search_class(scale, entry, c, queries, k, nprobe)
            img, pos = c.decode(i_c)
            shape = (q_count, c.positions.size, k)
            dist[:, c.positions] = d_c.reshape(shape)
            image[:, c.positions] = img.reshape(shape)
            position[:, c.positions] = pos.reshape(shape)
        if squeeze:
            dist, image, position = dist[0], image[0], position[0]
        if as_torch:
            return torch.from_numpy(dist), torch.from_numpy(image), torch.from_numpy(position)
        return dist, image, position

    def max_k(self, scale: ScaleLike) -> int:
        """The most vectors any layout class of ``scale`` holds over all shards: k beyond it only pads."""
        return max((c.width for c in self._layouts[self._scale(scale)]), default=0) * self.count

    def _flat_search(self, index: faiss.Index, key: tuple, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``index.search``, except for an exact Flat index and k >= TORCH_FLAT_MIN_K: a torch GEMM
        plus top-k over its (memory-mapped) vectors, 2.6x faster than FAISS's heaps at k = 1,024
        (676 queries over 676k vectors of dim 147 on 2 cores); with many more queries (batches of
        query images), or fewer than TORCH_FLAT_MIN_QUERIES, FAISS is faster. Same distances, same
        order."""
        flat = faiss.downcast_index(index)
        if (k < TORCH_FLAT_MIN_K or not TORCH_FLAT_MIN_QUERIES <= len(queries) <= TORCH_FLAT_MAX_QUERIES or not isinstance(flat, faiss.IndexFlat)
                or flat.metric_type != faiss.METRIC_L2):
            return index.search(queries, k)
        x = torch.from_numpy(faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d))
        if key not in self._norms:
            self._norms[key] = x.square().sum(1)
        norms, q = self._norms[key], torch.from_numpy(queries)
        rows = max(1, TORCH_FLAT_BYTES // (4 * flat.ntotal))
        out_d, out_i = [], []
        for lo in range(0, len(q), rows):
            d = torch.addmm(norms[None], q[lo : lo + rows], x.T, beta=1.0, alpha=-2.0)
            d += q[lo : lo + rows].square().sum(1, keepdim=True)
            vals, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
            out_d.append(vals)
            out_i.append(idx)
        return torch.cat(out_d).numpy(), torch.cat(out_i).numpy()

    def _search_class(self, scale: Scale, entry: dict[str, Any], c: ClassLayout, queries: np.ndarray, k: int,
                      nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Search every shard of one class with all its query rows at once; merge top-k by distance.

        Returns (nq, k) distances and global layout-coded ids (-1 / inf where missing).
        """
        spec = entry["classes"][c.index]
        parts_d, parts_i = [], []
        for shard in entry["shards"]:
            index = self._index(scale, shard, c)
            if index.ntotal == 0:
                continue
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.nprobe = int(min(ivf.nlist, nprobe or spec["nprobe"] or 1))
            d_s, i_s = self._flat_search(index, (scale, shard["id"], c.index), queries, min(k, index.ntotal))
            missing = i_s < 0
            parts_i.append(np.where(missing, -1, i_s + shard["first_image"] * c.width))
            parts_d.append(np.where(missing, np.inf, np.maximum(d_s, 0)).astype(np.float32))
        nq = len(queries)
        if not parts_d:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        d_all, i_all = np.concatenate(parts_d, axis=1), np.concatenate(parts_i, axis=1)
        if len(parts_d) > 1:
            order = np.argsort(d_all, axis=1, kind="stable")[:, :k]
            d_all, i_all = np.take_along_axis(d_all, order, 1), np.take_along_axis(i_all, order, 1)
        if d_all.shape[1] < k:
            pad = k - d_all.shape[1]
            d_all = np.pad(d_all, ((0, 0), (0, pad)), constant_values=np.inf)
            i_all = np.pad(i_all, ((0, 0), (0, pad)), constant_values=-1)
        return d_all, i_all


def affordable_k(queries: int, positions: int, per_result: int = 20) -> int:
    """The largest k whose results for (queries, positions) query patches fit in MAX_RESULT_BYTES."""
    return max(1, MAX_RESULT_BYTES // max(1, queries * positions * per_result))


def check_result_size(queries: int, positions: int, k: int, per_result: int = 20) -> None:
    """Refuse a search whose (queries, positions, k) results (float32 distance + two int64 ids, 20
    bytes each) would pass MAX_RESULT_BYTES, instead of dying in the allocation."""
    need = queries * positions * k * per_result
    if need > MAX_RESULT_BYTES:
        raise InputError(None, f"{queries} queries x {positions} positions x k = {k} neighbours would need "
                               f"{need / 2**30:.1f} GiB of search results (limit {MAX_RESULT_BYTES / 2**30:.0f} GiB); "
                               "lower k or search fewer queries at a time")


def _only_shards(entry: dict[str, Any], shards: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    """The scale entry with only the shards named for its scale in ``shards`` (all of them when None)."""
    if shards is None:
        return entry
    wanted = {int(i) for i in shards.get(entry["scale"], ())}
    missing = wanted - {s["id"] for s in entry["shards"]}
    if missing:
        raise InputError(None, f"scale {entry['scale']} has no shard(s) {sorted(missing)} "
                               f"(it has {[s['id'] for s in entry['shards']]})")
    return dict(entry, shards=[s for s in entry["shards"] if s["id"] in wanted])


def _manifest_changed(path: Path, seen: dict[str, Any] | None) -> bool:
    """Whether the manifest now on disk differs from ``seen`` (None: never read)."""
    if seen is None:
        return False
    try:
        return read_manifest(path) != seen
    except (IndexError_, OSError):
        return False
