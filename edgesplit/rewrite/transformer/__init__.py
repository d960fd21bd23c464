"""Split a Transformer the Megatron way: attention by heads, MLP by neurons, LM head by vocabulary.

Graph surgery only: `rewrite(graph, decision)` splits every block of each group of the decision into part slots
and returns the graph with typed regions whose parts have no device yet; `edgesplit.place.heads` assigns slots to
devices (and `split_heads` does both from a cluster).

    split = rewrite(graph, HeadsDecision(shares=((1.0, 1.0),)))      # every block in two equal parts
    regions, placement = place(split, [["pi-1", "pi-2"]])             # edgesplit.place.heads

Modules: `blocks` finds the sub-blocks (attention, MLP) and `labels` works out which of their elements must stay
together; `parts` cuts one sub-block into parts, `vocab` the LM head; `surgery` holds the state of one rewrite
(the editor, slots, side inputs); `check` compares the result with the unsplit model; `split` drives it.
"""

from edgesplit.rewrite.transformer.blocks import Skipped, TransformerSplitWarning
from edgesplit.rewrite.transformer.split import HeadsDecision, HeadsSplit, rewrite
from edgesplit.rewrite.transformer.surgery import GATHER, Slot, region_name

__all__ = ["GATHER", "HeadsDecision", "HeadsSplit", "Skipped", "Slot", "TransformerSplitWarning", "region_name",
           "rewrite"]
