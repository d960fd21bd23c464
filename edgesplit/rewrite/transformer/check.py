"""The split graph against the unsplit model on the sample inputs: a split is returned only if they agree.

With a sharded KV cache the split graph's interface differs (one past/present per part): `shard_feeds` and
`unshard_outputs` translate between the two. With a distributed argmax LM head, the split graph's token ids are
compared with the argmax of the unsplit logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgesplit.compare import compare
from edgesplit.graph import Graph
from edgesplit.probe import Concrete, run_model
from edgesplit.rewrite.base import SplitError

RTOL = 1e-4

# a cache input or output -> its per-part pieces: (name, axis, indices of the part's elements along the axis)
Pieces = Mapping[str, list[tuple[str, int, np.ndarray]]]


def shard_feeds(feeds: Mapping[str, np.ndarray], new_inputs: Pieces) -> dict[str, np.ndarray]:
    """The unsplit model's feeds for a graph split with kv_cache="shard": each part's slice of every cache input."""
    out = {k: v for k, v in feeds.items() if k not in new_inputs}
    for name, pieces in new_inputs.items():
        for part_name, axis, keep in pieces:
            out[part_name] = np.take(feeds[name], keep, axis=axis)
    return out


def unshard_outputs(outputs: Mapping[str, np.ndarray], new_outputs: Pieces) -> dict[str, np.ndarray]:
    """The unsplit model's outputs from a kv_cache="shard" graph's: the parts' caches put back together."""
    out = dict(outputs)
    for name, pieces in new_outputs.items():
        axis = pieces[0][1]
        order = np.concatenate([keep for _, _, keep in pieces])
        joined = np.concatenate([outputs[n] for n, _, _ in pieces], axis=axis)
        out[name] = np.take(joined, np.argsort(order), axis=axis)
    return out


def self_check(graph: Graph, sample: Concrete, new_inputs: Pieces, new_outputs: Pieces,
               argmax_outputs: Mapping[str, str]) -> float:
    """The largest relative error of the split graph on the sample inputs; raises above `RTOL`."""
    try:
        got = unshard_outputs(run_model(graph.model, shard_feeds(sample.inputs, new_inputs)), new_outputs)
    except Exception as exc:  # onnxruntime's own exception types
        raise SplitError(f"internal error: the split graph does not run on sample inputs "
                         f"({str(exc).splitlines()[0][:300]}); refusing it. Please report this model.") from None
    reference = {argmax_outputs.get(name, name): np.argmax(ref, axis=-1) if name in argmax_outputs else ref
                 for name, ref in sample.outputs.items()}  # greedy ids against the unsplit logits' argmax
    for name, ref in reference.items():
        if got[name].shape != ref.shape:
            raise SplitError(f"internal error: the split graph's output {name!r} has shape {got[name].shape}, "
                             f"expected {ref.shape}")
    diffs = compare(got, reference, RTOL)
    worst = max((d.max_rel for d in diffs), default=0.0)
    if not all(d.ok for d in diffs):
        raise SplitError(f"internal error: the split graph differs from the model on sample inputs (max relative "
                         f"error {worst:.3g}); refusing it. Please report this model.")
    return worst
