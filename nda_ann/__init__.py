"""nda-ann: nonparametric data attribution for diffusion models, via patch retrieval.

Pipeline: ``ingest`` a corpus into a Store -> ``build_index`` (FAISS, per scale and layout class)
-> ``Attributor.open(index).attribute(images)``; ``exact_scores`` is the reference scorer.
"""
__version__ = "0.1.0"

from .scoring.scales import Scale, parse_scales  # noqa: E402
from .scoring.schedule import NoiseSchedule, noise, noise_images  # noqa: E402
from .corpus.store import Store, write_store  # noqa: E402
from .corpus.ingest import ingest  # noqa: E402
from .scoring.exact import ExactResult, exact_attribution, exact_scores, patch_weights  # noqa: E402
from .attribution.attributor import Attribution, Attributor  # noqa: E402
from .index.torch_search import TorchFlatSearch  # noqa: E402
from .results.fidelity import fidelity, fidelity_table  # noqa: E402
from .index import PatchIndex, add_to_index, build_index  # noqa: E402
from .corpus.demo_corpus import demo_corpus  # noqa: E402
from .results.html_report import write_html_report  # noqa: E402
from .serve import ServeConfig, create_app  # noqa: E402  (fastapi and uvicorn load on first use)

__all__ = [
    "__version__", "Scale", "parse_scales", "NoiseSchedule", "noise", "noise_images", "Store", "write_store",
    "ingest", "ExactResult", "exact_attribution", "exact_scores", "patch_weights", "Attribution", "Attributor",
    "TorchFlatSearch", "fidelity", "fidelity_table", "PatchIndex", "add_to_index", "build_index", "demo_corpus",
    "write_html_report", "ServeConfig", "create_app",
]
