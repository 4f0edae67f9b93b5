"""Attribution through an index: candidate search, exact re-scoring, the outside-mass estimate,
tail scores and heatmaps, behind the ``Attributor`` front and its ``Attribution`` result."""
from .attributor import Attribution, Attributor

__all__ = ["Attribution", "Attributor"]
