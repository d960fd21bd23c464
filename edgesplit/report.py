"""Human and machine summaries of graphs and plans (rich tables, JSON-ready dicts)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.table import Table

from edgesplit.graph import Graph
from edgesplit.layout import Region, RegionStats
from edgesplit.plan import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def graph_rows(graph: Graph) -> list[dict[str, Any]]:
    return [
        {
            "name": layer.name,
            "op_type": layer.op_type,
            "output_shape": list(graph.tensors[layer.outputs[0]].shape) if layer.outputs else [],
            "params": layer.params,
            "macs": layer.macs,
            "output_bytes": sum(graph.tensors[t].nbytes for t in layer.outputs),
        }
        for layer in graph.layers
    ]


def graph_table(graph: Graph) -> Table:
    table = Table(title=f"{graph.name}: {len(graph.layers)} layers", show_footer=True)
    rows = graph_rows(graph)
    table.add_column("layer", footer="total", overflow="fold")
    table.add_column("op")
    table.add_column("output shape")
    table.add_column("params", justify="right", footer=f"{graph.total_params:,}")
    table.add_column("MACs", justify="right", footer=f"{graph.total_macs:,}")
    table.add_column("output bytes", justify="right", footer=human_bytes(sum(r["output_bytes"] for r in rows)))
    for r in rows:
        shape = "×".join(str(d) for d in r["output_shape"])
        table.add_row(r["name"], r["op_type"], shape, f"{r['params']:,}", f"{r['macs']:,}", human_bytes(r["output_bytes"]))
    return table


def device_summary(plan: Plan) -> list[dict[str, Any]]:
    """Per device: stages, parameter bytes, MACs share, bytes sent and received per inference."""
    total_macs = sum(s.macs for s in plan.stages) or 1
    device_of = {s.name: s.device for s in plan.stages}
    sent: dict[str, int] = defaultdict(int)
    received: dict[str, int] = defaultdict(int)
    for t in plan.transfers:
        if not t.between_devices:
            continue
        sent[device_of[t.src]] += t.nbytes
        received[device_of[t.dst]] += t.nbytes
    rows = []
    for device in plan.cluster.names:
        stages = plan.device_stages(device)
        rows.append({
            "device": device,
            "stages": [s.name for s in stages],
            "layers": sum(len(s.layers) for s in stages),
            "param_bytes": sum(s.param_bytes for s in stages),
            "macs": sum(s.macs for s in stages),
            "macs_share": sum(s.macs for s in stages) / total_macs,
            "sent_bytes": sent[device],
            "received_bytes": received[device],
        })
    return rows


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"plan for {plan.model_name}: {len(plan.stages)} stages, "
                        f"{len(plan.cross_device_transfers)} cross-device tensors, "
                        f"{human_bytes(plan.wire_bytes())} on the wire per inference")
    for col in ("device", "stages", "layers", "param bytes", "MACs share", "sends", "receives"):
        table.add_column(col, justify="left" if col in ("device", "stages") else "right")
    for r in device_summary(plan):
        table.add_row(r["device"], ", ".join(r["stages"]) or "-", str(r["layers"]), human_bytes(r["param_bytes"]),
                      f"{r['macs_share']:.1%}", human_bytes(r["sent_bytes"]), human_bytes(r["received_bytes"]))
    return table


def transfer_table(plan: Plan) -> Table:
    device_of = {s.name: s.device for s in plan.stages}
    table = Table(title="transfers between devices (per inference, batch 1)")
    for col in ("tensor", "from", "to", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for t in plan.transfers:
        if t.between_devices:
            table.add_row(t.tensor, f"{t.src} ({device_of[t.src]})", f"{t.dst} ({device_of[t.dst]})", human_bytes(t.nbytes))
    return table


def region_rows(plan: Plan) -> list[dict[str, Any]]:
    """Per horizontal region: kind, each device's share, synchronisation points, bytes exchanged, halo overhead."""
    stage_of = {n: s.name for s in plan.stages for n in s.layers}
    rows = []
    for r in plan.regions:
        exchanged = region_bytes(plan, r)
        shares: dict[str, float] = defaultdict(float)
        for p in r.parts:
            shares[str(p.device)] += p.share
        stats = r.stats or RegionStats()
        rows.append({
            "name": r.name, "kind": r.kind.value, "layers": len(r.layers),
            "shares": dict(shares),
            "sync_points": [r.combine_node],  # grid row concats run on the same device as the final combine
            "combine_stage": stage_of.get(r.combine_node),
            "bytes_exchanged": exchanged,
            "redundant_macs": stats.redundant_macs,
            "halo_overhead": (stats.redundant_macs / stats.macs) if stats.macs else 0.0,
            "halo_bytes": stats.halo_bytes,
            "replicas": len(r.replicas),
        })
    return rows


def region_bytes(plan: Plan, region: Region) -> int:
    """Bytes a region moves between devices per inference: its inputs into its parts, its parts into its combine."""
    stage_nodes = {s.name: set(s.layers) for s in plan.stages}
    parts = set(region.nodes)
    combines = set(region.combine_nodes or (region.combine_node,))
    inputs, outputs = set(region.stats.inputs if region.stats else ()), set(region.outputs)
    total = 0
    for t in plan.cross_device_transfers:
        into = stage_nodes.get(t.dst, set())
        if (t.tensor in inputs and into & parts) or (t.tensor in outputs and into & combines):
            total += t.nbytes
    return total


def region_table(plan: Plan) -> Table:
    rows = region_rows(plan)
    syncs = len({p for r in rows for p in r["sync_points"]})  # regions merged by a Concat share one
    table = Table(title=f"horizontal regions: {len(rows)} regions, {syncs} synchronisation points per inference")
    for col in ("region", "kind", "layers", "device shares", "sync at", "bytes exchanged", "halo overhead"):
        table.add_column(col, justify="right" if col in ("layers", "bytes exchanged", "halo overhead") else "left")
    for r in rows:
        shares = ", ".join(f"{d} {s:.0%}" for d, s in r["shares"].items())
        halo = f"{r['halo_overhead']:.1%} MACs, {human_bytes(r['halo_bytes'])}" if r["kind"] in (
            "height", "width", "grid", "fused-spatial") else "-"
        table.add_row(r["name"], r["kind"], str(r["layers"]), shares, ", ".join(r["sync_points"]),
                      human_bytes(r["bytes_exchanged"]), halo)
    return table
