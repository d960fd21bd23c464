"""The rewrite: every attention / MLP block of a decision's groups split into parts, the LM head by vocabulary.

Each attention / MLP sub-block becomes one part per slot of its block's group (`parts`) plus one Sum: two
synchronisations per block. Norms, residual adds and the bias of each exit run once, outside the parts (on the
group's root when placed: a star reduction). Side inputs of a part (masks, rotary tables, shape vectors) are
recomputed in its slot from the model inputs where possible, else received once per slot. Blocks may be spread
over groups (hybrid with vertical cuts). The result is checked against the unsplit model on sample inputs before
it is returned; what is not recognised is reported (`skipped`) and left whole.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from onnx import numpy_helper

from edgesplit import probe
from edgesplit.graph import Graph
from edgesplit.layout import KvCache, LmHead, SplitKind
from edgesplit.rewrite.base import Editor, SplitError, sizes
from edgesplit.rewrite.transformer.blocks import Skipped, SubBlock, find
from edgesplit.rewrite.transformer.check import self_check
from edgesplit.rewrite.transformer.parts import split_block
from edgesplit.rewrite.transformer.surgery import Built, Piece, Slot, Surgery
from edgesplit.rewrite.transformer.vocab import lm_head, split_vocab


@dataclass(frozen=True)
class HeadsDecision:
    """How to split: per group, the weight of each of its part slots (a group of one slot leaves its blocks
    whole); `boundaries` the first block of each later group (default: proportional to each group's total weight).
    `allow_idle` leaves slots out of a sub-block with fewer head groups / neurons than slots instead of raising.
    `kv_cache` SHARD gives each part its own `past_X.pN` input and `present_X.pN` output (N = part), GATHER keeps
    the model's interface. `lm_head` ARGMAX sends only each part's best logit and its index, and the logits output
    becomes `<logits>.argmax` (greedy token ids)."""

    shares: tuple[tuple[float, ...], ...]
    boundaries: tuple[int, ...] | None = None
    vocab: bool = True
    allow_idle: bool = False
    kv_cache: KvCache = KvCache.GATHER
    lm_head: LmHead = LmHead.CONCAT

    def problems(self) -> list[str]:
        out = [] if self.shares else ["expected at least one group of part slots, got none"]
        for g, weights in enumerate(self.shares):
            if not weights:
                out.append(f"group {g}: expected at least one part slot, got none")
            elif any(not w > 0 for w in weights):
                out.append(f"group {g}: expected positive shares, got {list(weights)}")
        return out


@dataclass(frozen=True)
class HeadsSplit:
    """The rewritten graph (its new regions' parts unplaced: `edgesplit.place.heads` assigns devices to slots),
    the slot of every part, the group of every block, and what was left unsplit."""

    graph: Graph
    decision: HeadsDecision
    slots: Mapping[str, tuple[Slot, ...]]  # region name -> the slot of each of its parts
    block_groups: tuple[int, ...]  # the group each block went to
    node_blocks: Mapping[str, int]  # the block of each source node no part holds (0 before the first block)
    skipped: tuple[Skipped, ...]
    max_rel_error: float  # of the self-check against the unsplit model on sample inputs (nan: not checked)

    @property
    def blocks(self) -> int:
        return len(self.block_groups)


def rewrite(graph: Graph, decision: HeadsDecision, dims: Mapping[str, int] | None = None,
            check: bool = True) -> HeadsSplit:
    """Split `graph` as `decision` says. `dims` sizes symbolic dims for the sample run; `check` compares the
    result with the unsplit model on it."""
    problems = decision.problems()
    if problems:
        raise SplitError("invalid split decision for the transformer split:\n  " + "\n  ".join(problems))
    base = fold_weight_views(graph)
    sample = probe.run(base, probe.sample_inputs(base, dims))
    subs, skipped = find(base, sample)
    block_of = _blocks(subs)
    block_groups = _group_runs(max(block_of, default=-1) + 1, decision)
    surgery = Surgery(base, sample, decision.kv_cache == KvCache.SHARD)
    built = _split_blocks(surgery, subs, block_of, block_groups, decision)
    if decision.vocab:
        built += _split_lm_head(surgery, base, subs, block_groups, decision)
    out = replace(surgery.finish(built), path=graph.path)
    err = self_check(out, sample, surgery.new_inputs, surgery.new_outputs, surgery.argmax_outputs) if check \
        else float("nan")
    return HeadsSplit(out, decision, {b.region.name: b.slots for b in built}, tuple(block_groups),
                      _node_blocks(out, base, subs, block_of), tuple(skipped), err)


def _split_blocks(s: Surgery, subs: Sequence[SubBlock], block_of: Sequence[int], block_groups: Sequence[int],
                  decision: HeadsDecision) -> list[Built]:
    built: list[Built] = []
    attention: tuple[dict[int, float], float] = ({}, 0.0)  # cost per slot of the block's attention, and in all
    for i, (sub, b) in enumerate(zip(subs, block_of)):
        group = block_groups[b]
        weights = decision.shares[group]
        if len(weights) < 2:
            continue
        if sub.kind == SplitKind.NEURONS and i and block_of[i - 1] == b and subs[i - 1].kind == SplitKind.HEADS:
            weights = _compensate(weights, *attention, _cost_total(sub))
        pieces, cost = _allocate(sub, group, weights, decision.allow_idle)
        if sub.kind == SplitKind.HEADS:
            attention = ({p.slot.part: p.share * cost.sum() for p in pieces}, float(cost.sum()))
        if len(pieces) > 1:
            built += split_block(s, sub, pieces, b)
    return built


def _split_lm_head(s: Surgery, base: Graph, subs: Sequence[SubBlock], block_groups: Sequence[int],
                   decision: HeadsDecision) -> list[Built]:
    """The LM head on the group of the last block (the last group if there are no blocks)."""
    head = lm_head(base, {n for sub in subs for n in sub.nodes})
    group = block_groups[-1] if block_groups else len(decision.shares) - 1
    weights = decision.shares[group]
    if head is None or len(weights) < 2:
        return []
    return [split_vocab(s, head, group, weights, decision.lm_head == LmHead.ARGMAX)]


def _blocks(subs: Sequence[SubBlock]) -> list[int]:
    """A block starts at every attention sub-block; an MLP belongs to the attention before it, if any."""
    out, b, prev = [], -1, SplitKind.HEADS
    for sub in subs:
        if sub.kind == SplitKind.HEADS or prev == SplitKind.NEURONS or b < 0:
            b += 1
        out.append(b)
        prev = sub.kind
    return out


def _group_runs(n_blocks: int, decision: HeadsDecision) -> list[int]:
    """The group of each block: consecutive runs, from the decision's boundaries or by each group's weight."""
    k = len(decision.shares)
    boundaries = decision.boundaries
    if boundaries is None:
        weight = np.array([sum(g) for g in decision.shares])
        cum = np.cumsum(weight) / weight.sum()
        boundaries = tuple(int(round(c * n_blocks)) for c in cum[:-1])
    bounds = [0, *[int(b) for b in boundaries], n_blocks]
    if len(bounds) != k + 1 or any(a > b for a, b in zip(bounds, bounds[1:])) or bounds[-2] > n_blocks:
        raise SplitError(f"expected {k - 1} increasing block boundaries within 0..{n_blocks} for {k} groups, "
                         f"got {list(boundaries)}")
    return [next(g for g in range(k) if bounds[g] <= b < bounds[g + 1]) for b in range(n_blocks)]


def _allocate(sub: SubBlock, group: int, weights: Sequence[float], allow_idle: bool) -> tuple[list[Piece], np.ndarray]:
    """Consecutive classes (head groups / neurons, of equal cost in every model seen) to each slot, their number
    proportional to the slot's weight (largest remainder); every slot gets at least one unless `allow_idle`.
    Also the cost of each class: its entry columns plus its exit rows (all rows and columns have one length)."""
    lab = sub.labels
    classes_at_exit = lab.classes(lab.tensors[sub.exit_input].labels)
    order = sorted(set(classes_at_exit.tolist()))
    all_classes = lab.classes(np.arange(lab.size))
    cost = np.array([np.count_nonzero(all_classes == c) + np.count_nonzero(classes_at_exit == c) for c in order],
                    dtype=float)
    heads = sub.kind == SplitKind.HEADS
    what = f"{'attention' if heads else 'MLP'} at {sub.exit!r} ({len(order)} {'head groups' if heads else 'neurons'})"
    idle = len(weights) - len(order)
    counts = sizes(len(order), weights, what, allow_idle, remedy=f"Use fewer devices for it, or allow_idle=True to "
                                                                 f"leave {idle} device(s) out of this sub-block")
    pieces, start = [], 0
    for p, n in enumerate(counts):
        if n:
            share = float(cost[start:start + n].sum() / cost.sum())
            pieces.append(Piece(Slot(group, p), frozenset(order[start:start + n]), share))
        start += n
    return pieces, cost


def _cost_total(sub: SubBlock) -> float:
    return float(sub.labels.size + len(sub.labels.tensors[sub.exit_input].labels))


def _compensate(weights: Sequence[float], attention: Mapping[int, float], attention_total: float,
                mlp_total: float) -> list[float]:
    """MLP weights that even out the block: a slot with more than its share of heads (head groups come whole, so
    9 heads over 2 slots is 6 + 3) gets fewer neurons, so that its whole block is close to its share."""
    total = sum(weights)
    block = attention_total + mlp_total
    return [max(w / total * block - attention.get(p, 0.0), 1e-3 * block) for p, w in enumerate(weights)]


def _node_blocks(out: Graph, base: Graph, subs: Sequence[SubBlock], block_of: Sequence[int]) -> dict[str, int]:
    """The block of every source node that no part holds: its sub-block's (one left whole), else the block of the
    last exit before it (block 0 before the first)."""
    if not subs:
        return {}
    in_parts = {n for r in out.regions for n in r.nodes}
    whole = {n: b for sub, b in zip(subs, block_of) for n in sub.nodes}
    pos = {n.name: i for i, n in enumerate(base.model.graph.node)}
    exits = sorted((pos[sub.exit], b) for sub, b in zip(subs, block_of))
    at = [p for p, _ in exits]
    blocks = {}
    for layer in out.layers:
        n = layer.name
        if n in in_parts or n not in pos:
            continue
        k = bisect.bisect_left(at, pos[n])
        blocks[n] = whole[n] if n in whole else exits[k - 1][1] if k else 0
    return blocks


def fold_weight_views(graph: Graph) -> Graph:
    """Transpose(weight) -> a transposed weight (exporters that keep W as [out, in]); Identity(weight) -> a weight
    (the TorchScript exporter's de-duplication of equal initializers)."""
    inits = graph.initializers
    folds = [n for n in graph.model.graph.node if n.input and n.input[0] in inits and (
        n.op_type == "Identity" or (n.op_type == "Transpose" and len(inits[n.input[0]].dims) == 2))]
    if not folds:
        return graph
    edit = Editor(graph)
    edit.remove(n.name for n in folds)
    for n in folds:
        w = numpy_helper.to_array(inits[n.input[0]])
        edit.define(n.output[0], w.T.copy() if n.op_type == "Transpose" else w)
    return edit.finish()
