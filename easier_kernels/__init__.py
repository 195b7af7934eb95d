"""easier_kernels: EASIER depth pruning for PyTorch, on real kernels.

    import easier_kernels as ek
    sites = ek.find_sites(model, example_inputs)       # one Site per activation call
    scores = ek.entropy_scores(model, loader)          # site name -> layer entropy (bits)
    net = ek.linearize(model, scores.ranking()[:2], example_inputs)
    result = ek.prune(model, train_loader, val_loader, max_drop=1.0)   # the EASIER loop
    result = ek.prune(..., select="entropy_latency", latency_target=0.7)  # spend the accuracy budget on speed
    ek.payoff.measure(result.model, model, example_inputs)  # latency ratio, MACs, parameters once folded
    fast = ek.fold(result.model, example_inputs)       # chains run per plan, never slower as a whole
    hf_model = ek.write_back(fast, model)              # the fold inside the model's own modules (generate() works)
    ek.export(fast, example_inputs, "model.onnx")      # a file that runs without this package
    counts = ek.ops.count_on(x)                        # per-channel on-counts, int64
"""

from . import activations, capture, data, depth, models, ops, payoff, recovery, tasks, text, train
from .entropy import EntropyMeter, Scores, entropy_scores
from .export import export, load_folded, save_folded
from .fold import InexactFold, WriteBackError, fold, format_decisions, write_back
from .linearize import linearize, recipe
from .prune import Pruner, PruneResult, Step, load, prune
from .sites import Site, find_sites

__version__ = "0.1.0"
__all__ = ["ops", "models", "data", "text", "tasks", "depth", "payoff", "recovery", "capture", "activations", "Site", "find_sites", "Scores", "entropy_scores",
           "EntropyMeter", "linearize", "recipe", "train", "prune", "Pruner", "PruneResult", "Step", "load", "fold",
           "format_decisions", "InexactFold", "write_back", "WriteBackError", "export", "save_folded", "load_folded",
           "__version__"]
