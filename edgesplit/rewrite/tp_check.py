"""The split graph against the unsplit model on the sample inputs: a split is returned only if they agree.

With a sharded KV cache the split graph's interface differs (one past/present per part): `shard_feeds` and
`unshard_outputs` translate between the two.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgesplit.graph import Graph
from edgesplit.rewrite import concrete as concrete_run
from edgesplit.rewrite.base import SplitError


def shard_feeds(feeds: Mapping[str, np.ndarray], new_inputs) -> dict[str, np.ndarray]:
    """The unsplit model's feeds for a graph split with kv_cache="shard": each part's slice of every cache input."""
    out = {k: v for k, v in feeds.items() if k not in new_inputs}
    for name, pieces in new_inputs.items():
        for part_name, axis, keep in pieces:
            out[part_name] = np.take(feeds[name], keep, axis=axis)
    return out


def unshard_outputs(outputs: Mapping[str, np.ndarray], new_outputs) -> dict[str, np.ndarray]:
    """The unsplit model's outputs from a kv_cache="shard" graph's: the parts' caches put back together."""
    out = {k: v for k, v in outputs.items()}
    for name, pieces in new_outputs.items():
        axis = pieces[0][1]
        order = np.concatenate([keep for _, _, keep in pieces])
        joined = np.concatenate([outputs[n] for n, _, _ in pieces], axis=axis)
        out[name] = np.take(joined, np.argsort(order), axis=axis)
    return out


def self_check(graph: Graph, sample: concrete_run.Concrete, new_inputs, new_outputs, argmax_outputs) -> float:
    try:
        got = unshard_outputs(concrete_run.run_model(graph.model, shard_feeds(sample.inputs, new_inputs)), new_outputs)
    except Exception as exc:  # onnxruntime's own exception types
        raise SplitError(f"internal error: the split graph does not run on sample inputs "
                         f"({str(exc).splitlines()[0][:300]}); refusing it. Please report this model.") from None
    worst = 0.0
    for name, ref in sample.outputs.items():
        if name in argmax_outputs:  # greedy ids against the unsplit logits' argmax
            name, ref = argmax_outputs[name], np.argmax(ref, axis=-1)
        g = got[name]
        if g.shape != ref.shape:
            raise SplitError(f"internal error: the split graph's output {name!r} has shape {g.shape}, "
                             f"expected {ref.shape}")
        if ref.dtype.kind in "fc":
            scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
            rel = float(np.max(np.abs(g.astype(np.float64) - ref), initial=0.0)) / scale
        else:
            rel = float(np.count_nonzero(g != ref))
        worst = max(worst, rel)
    if not worst <= 1e-4:
        raise SplitError(f"internal error: the split graph differs from the model on sample inputs (max relative "
                         f"error {worst:.3g}); refusing it. Please report this model.")
    return worst
