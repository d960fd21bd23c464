"""place: every node of a (rewritten) graph gets a device — from a mapping, by vertical balance, or, for the parts
of horizontal regions, from the devices their split asked for. `place.heads` places a Transformer split (slots of
device groups) and is imported on its own: it brings the Transformer rewrite with it."""

from edgesplit.place.vertical import (balance, check_memory, expand_layers, from_mapping, load_mapping,
                                      memory_need)

__all__ = ["balance", "check_memory", "expand_layers", "from_mapping", "load_mapping", "memory_need"]
