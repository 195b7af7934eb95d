"""Folding (DESIGN.md, "Folding: the math and the traps"), one module per concern:

    algebra   the weight math as small pure functions (compose convs and linears, add an identity)
    chains    batch norms into their layers; the linear chains a linearization leaves; gated sites
    blocks    the fused pointwise/depthwise block as a module, and its standard-module form
    plans     how a chain can run (separate / merged / fused) and the padding layout each needs
    planner   timing the plans in a runtime and choosing (used by `ek.linearize` and `fold`)
    gains     the latency each remaining site's linearization would save (latency-aware selection)
    graph     the pass itself: `fold(model, example_inputs, runtime=...)`
    write_back  a fold put back into the model's own module tree (a Hugging Face model stays one)

    fast = fold(net, example_inputs)                     # chains run per plan, never slower as a whole
    print(format_decisions(decisions(fast)))
"""

from .algebra import add_identity, compose_conv, compose_linear, dense_weight, merged_layer
from .blocks import FusedConvBlock, StandardConvBlock, lower_fused
from .chains import find_chains, fold_batch_norms, gated_sites
from .graph import DECIDE, InexactFold, decisions, fold, format_decisions
from .planner import plan_chains
from .write_back import WriteBackError, write_back

__all__ = ["fold", "decisions", "format_decisions", "DECIDE", "InexactFold", "plan_chains", "find_chains", "fold_batch_norms",
           "gated_sites", "write_back", "WriteBackError",
           "FusedConvBlock", "StandardConvBlock", "lower_fused", "dense_weight", "compose_conv", "add_identity",
           "compose_linear", "merged_layer"]
