"""The scores themselves (docs/scores.md): noise schedules, scales, patches and their layout classes,
the dense log-mass kernels, and the exact reference scorer."""
from .exact import ExactResult, exact_attribution, exact_scores, patch_weights
from .scales import Scale, parse_scales
from .schedule import NoiseSchedule, noise, noise_images

__all__ = ["ExactResult", "NoiseSchedule", "Scale", "exact_attribution", "exact_scores", "noise", "noise_images",
           "parse_scales", "patch_weights"]
