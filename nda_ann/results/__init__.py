"""What a run hands back: score tables (Parquet), figures, results folders, fidelity metrics."""
from .fidelity import fidelity, fidelity_table

__all__ = ["fidelity", "fidelity_table"]
