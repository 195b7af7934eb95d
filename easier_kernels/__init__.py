"""easier_kernels: EASIER depth pruning for PyTorch, on real kernels.

    import easier_kernels as ek
    sites = ek.find_sites(model, example_inputs)       # one Site per activation call
    scores = ek.entropy_scores(model, loader)          # site name -> layer entropy (bits)
    net = ek.linearize(model, scores.ranking()[:2], example_inputs)
    counts = ek.ops.count_on(x)                        # per-channel on-counts, int64
"""

from . import data, models, ops
from .entropy import EntropyMeter, Scores, entropy_scores
from .linearize import linearize, recipe
from .sites import Site, find_sites

__version__ = "0.1.0"
__all__ = ["ops", "models", "data", "Site", "find_sites", "Scores", "entropy_scores", "EntropyMeter", "linearize", "recipe",
           "__version__"]
