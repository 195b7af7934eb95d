"""easier_kernels: EASIER depth pruning for PyTorch, on real kernels.

    import easier_kernels as ek
    ek.ops.available_backends()        # e.g. ['reference', 'cpp']
    counts = ek.ops.count_on(x)        # per-channel on-counts, int64
"""

from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
