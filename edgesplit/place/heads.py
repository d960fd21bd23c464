"""Placement of a Transformer split: slot p of group g on device groups[g][p], everything else on the root (first
device) of its block's group; and `split_heads`, the rewrite and its placement from a cluster in one call.

    split, placement = split_heads(graph, cluster)          # every block over every device, shares = speeds
    plan = cut(split.graph, cluster, placement)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from edgesplit.cluster import Cluster
from edgesplit.graph import Graph
from edgesplit.layout import E, KvCache, LmHead, Region
from edgesplit.rewrite.base import SplitError
from edgesplit.rewrite.transformer import HeadsDecision, HeadsSplit, rewrite

Placement = dict[str, str]


def place(split: HeadsSplit, groups: Sequence[Sequence[str]]) -> tuple[tuple[Region, ...], Placement]:
    """The split's regions with their parts on their slots' devices, and a device for every node: parts on their
    slot's, combines and what the parts do not hold on the root of its block's group, nodes the rewrite added
    outside parts (bias adds, vocabulary combines) where their first placed input is."""
    _check_groups(split, groups)
    roots = [g[0] for g in groups]
    block_root = [roots[g] for g in split.block_groups]
    device: Placement = {}
    regions = []
    for r in split.graph.regions:
        slots = split.slots.get(r.name)
        if slots is not None:
            r = r.with_parts([replace(p, device=groups[s.group][s.part]) for p, s in zip(r.parts, slots)])
        regions.append(r)
        for part in r.parts:
            device.update(dict.fromkeys(part.nodes, part.device))
            for rep in part.replicas:
                device.update(dict.fromkeys(rep.nodes, rep.device))
    for r in regions:
        if r.block is not None and r.combine_node not in device:
            device[r.combine_node] = block_root[r.block]
    producers = split.graph.producers()
    last_root = block_root[-1] if block_root else roots[0]
    for layer in split.graph.layers:
        n = layer.name
        if n in device:
            continue
        if n in split.node_blocks:
            device[n] = block_root[split.node_blocks[n]]
            continue
        src = next((producers[t] for t in layer.inputs if t in producers and producers[t] in device), None)
        device[n] = device[src] if src else last_root
    return tuple(regions), device


def _check_groups(split: HeadsSplit, groups: Sequence[Sequence[str]]) -> None:
    want = [len(g) for g in split.decision.shares]
    got = [len(g) for g in groups]
    if want != got:
        raise SplitError(f"expected device groups of sizes {want} (one device per part slot), got sizes {got}")


def split_heads(
    graph: Graph,
    cluster: Cluster,
    devices: Sequence[str] | None = None,
    shares: Mapping[str, float] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    boundaries: Sequence[int] | None = None,
    vocab: bool = True,
    allow_idle: bool = False,
    dims: Mapping[str, int] | None = None,
    check: bool = True,
    kv_cache: KvCache | str = KvCache.GATHER,
    lm_head: LmHead | str = LmHead.CONCAT,
) -> tuple[HeadsSplit, Placement]:
    """Split every attention and MLP block (and the LM head) of `graph` over devices, and place it.

    `devices` (default: all, in cluster order) share every block; or `groups` (lists of devices) take consecutive
    runs of blocks (hybrid: vertical cuts between groups), starting at `boundaries` (first block of each later
    group; default: proportional to each group's total speed). `shares` weight devices (default: their speed).
    A sub-block with fewer head groups / neurons than devices raises, unless `allow_idle` leaves devices out of it.
    `dims` sizes symbolic dims for the sample run. `check` compares the result with the unsplit model.
    `kv_cache`: "gather" keeps the model's interface (each part slices the past it needs; presents are concatenated
    back); "shard" gives each part its own `past_X.pN` input and `present_X.pN` output (N = part), so every device
    keeps the cache of its own heads and only hidden states cross devices during generation.
    `lm_head`: "concat" gathers the vocabulary slices of the logits; "argmax" sends only each part's best logit and
    its index, and the model's logits output becomes `<logits>.argmax` (greedy token ids, [batch, sequence]).
    Returns the split, its regions' parts on their devices, and the device of every node.
    """
    cache, head = _choice(KvCache, kv_cache, "kv_cache"), _choice(LmHead, lm_head, "lm_head")
    device_groups = _groups(cluster, devices, groups)
    weight = _shares(cluster, device_groups, shares)
    decision = HeadsDecision(tuple(tuple(weight[d] for d in g) for g in device_groups),
                             tuple(boundaries) if boundaries is not None else None, vocab, allow_idle, cache, head)
    split = rewrite(graph, decision, dims=dims, check=check)
    regions, placement = place(split, device_groups)
    return replace(split, graph=replace(split.graph, regions=regions)), placement


def _choice(kind: type[E], value: object, what: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise SplitError(f"{what}: expected {' or '.join(repr(n) for n in kind.names())}, got {value!r}") from None


def _groups(cluster: Cluster, devices: Sequence[str] | None,
            groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
    if groups is not None and devices is not None:
        raise SplitError("expected either devices=[...] (one group) or groups=[[...], ...], got both")
    groups = [list(g) for g in groups] if groups is not None else [list(devices or cluster.names)]
    problems = [f"device {d!r} is not in the cluster {list(cluster.names)}" for g in groups for d in g
                if d not in cluster.names]
    flat = [d for g in groups for d in g]
    problems += [f"device {d!r} is listed twice" for d in sorted({d for d in flat if flat.count(d) > 1})]
    problems += ["expected non-empty device groups, got an empty one"] if any(not g for g in groups) else []
    if problems:
        raise SplitError("invalid devices for the transformer split:\n  " + "\n  ".join(problems))
    return groups


def _shares(cluster: Cluster, groups: Sequence[Sequence[str]], shares: Mapping[str, float] | None) -> dict[str, float]:
    out = {d: cluster.device(d).speed for g in groups for d in g}
    for d, w in (shares or {}).items():
        if d not in out:
            raise SplitError(f"shares name device {d!r}, expected one of {list(out)}")
        if not float(w) > 0:
            raise SplitError(f"share of device {d!r}: expected a positive number, got {w!r}")
        out[d] = float(w)
    return out
