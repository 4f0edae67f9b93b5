"""The two benchmark corpora of the fidelity-at-scale runs, by size, and their held-out queries.

- ``crops``: tools/make_corpus.py, 32x32 crops of the 11 photographs scikit-image and scikit-learn ship
  (tools/million.py makes the shards and stores under WORK/million); queries are the demo corpus's
  held-out strips of those photographs.
- ``photos``: tools/make_photo_corpus.py, 32x32 crops of the 370 distinct photographs of Debian's
  packages (tools/install_photos.sh); queries: half from held-out strips of training photographs
  ("seen"), half from photographs no training crop comes from ("unseen").
A size-n corpus is the first n images of the 1M shards; its store is WORK/<corpus>/store-<size>.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

SIZES = {"5k": 5_000, "20k": 20_000, "100k": 100_000, "300k": 300_000, "1m": 1_000_000}
QUERIES = 8  # per corpus: crops 8 held-out strips; photos 4 seen + 4 unseen


def store_path(work: Path, corpus: str, size: str) -> Path:
    return Path(work) / ("million" if corpus == "crops" else "photos") / f"store-{size}"


def source_dir(work: Path, corpus: str) -> Path:
    return Path(work) / ("million/corpus-1m" if corpus == "crops" else "photos/corpus-1m")


def queries(work: Path, corpus: str, count: int = QUERIES) -> tuple[np.ndarray, list[str], list[str]]:
    """((Q, 32, 32, 3) uint8 queries, names, kinds) of a corpus."""
    if corpus == "crops":
        from nda_ann.corpus.demo_corpus import demo_corpus

        dc = demo_corpus(n_train=100, n_queries=count, seed=0)
        return dc.queries, [f"crops-q{i}" for i in range(count)], ["seen"] * count
    from photo_corpus import photo_queries

    images, names, kinds = photo_queries(count // 2, count - count // 2, seed=0, corpus=source_dir(work, corpus))
    return images, names, kinds
