"""nda-ann: nonparametric data attribution for diffusion models, via patch retrieval."""
__version__ = "0.1.0"

from .scales import Scale, parse_scales  # noqa: E402
from .schedule import NoiseSchedule, noise, noise_images  # noqa: E402
from .store import Store, write_store  # noqa: E402

__all__ = ["__version__", "Scale", "parse_scales", "NoiseSchedule", "noise", "noise_images", "Store", "write_store"]
