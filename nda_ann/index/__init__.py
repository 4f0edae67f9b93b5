"""Patch indexes: multiscale patch vectors in FAISS sub-indexes per layout class, sharded by image range.

Modules: layout_ids (classes, stride rule, id space), factory (index choice), plan (per-scale plan),
train (templates), shard (streamed adds), build (build / add, staged and resumable), manifest (folder
layout, checks), search (PatchIndex), info (summary), recipe (build settings files), gpu, phases
(estimates and timing logs). Tests: tests/index/test_index_build.py, tests/index/test_index_search.py; benchmark:
tools/bench_build.py.
"""
from .build import add_to_index, build_index
from .factory import ClassSpec, parse_memory
from .layout_ids import STRIDE_RULE, ClassLayout, class_layouts
from .manifest import resolve_index_path
from .search import PatchIndex

__all__ = ["build_index", "add_to_index", "PatchIndex", "ClassSpec", "ClassLayout", "class_layouts",
           "parse_memory", "resolve_index_path", "STRIDE_RULE"]
