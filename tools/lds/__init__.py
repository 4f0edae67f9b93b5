"""LDS evaluation harness (docs/scores.md section 7): train diffusion models on random subsets, measure their
losses on queries, and score how well each attribution method predicts those losses.

Modules: config (settings), data (images, subsets), unet (model), train (training, checkpoints,
DDIM), losses (measured losses), methods (attribution methods), lds (metric and intervals),
run (the resumable pipeline and its command line), report (tables, plot, BENCHMARKS section).
"""
__all__ = ["config", "data", "unet", "train", "losses", "methods", "lds", "run", "report"]
