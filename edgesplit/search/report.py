"""Tables of a search: the front beside its baselines, and predictions beside measured runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table

from edgesplit.cluster import Cluster
from edgesplit.graph import Graph
from edgesplit.search import validate
from edgesplit.search.cost import CostModel, Costs, Overheads
from edgesplit.search.space import Vertical
from edgesplit.search.nsga import Objective, Result


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _stages(model: CostModel, v: Vertical) -> str:
    names = model.cluster.names
    standby = dict(zip(v.order, v.standby or (-1,) * len(v.order)))
    return " ".join("&".join(names[d] for d in g.devices) + f":{g.end - g.first}"
                    + (f"(+{names[standby[g.lead]]})" if standby[g.lead] >= 0 else "") for g in v.groups(model.n))


def _row(model: CostModel, name: str, v: Vertical, c: Costs) -> list[str]:
    received = ", ".join(f"{d} {_mib(r)}" for d, r in zip(model.cluster.names, c.received) if r)
    return [name, _stages(model, v), f"{c.latency * 1e3:.2f}", f"{c.throughput:.1f}", _mib(c.max_memory),
            f"{sum(c.energy):.3f}", _mib(c.wire_bytes), received or "-", f"{c.survived:.0%}"]


def front_table(model: CostModel, result: Result, bases: Sequence, objectives: Sequence[Objective],
                chosen: int) -> Table:
    table = Table(title=f"front ({', '.join(o.value for o in objectives)}; predicted; energy is an estimate)")
    for col in ("point", "device:layers", "latency ms", "answers/s", "max MiB", "energy J", "wire MiB",
                "received MiB", "losses survived"):
        table.add_column(col, justify="left" if col in ("point", "device:layers", "received MiB") else "right")
    for b in bases:
        table.add_row(*_row(model, b.name + ("" if b.feasible else " (over budget)"), b.layout, b.costs))
    for i, p in enumerate(result.front):
        table.add_row(*_row(model, f"#{i}" + (" picked" if i == chosen else ""), p.layout, p.costs))
    return table


def validation_table(graph: Graph, cluster: Cluster, profiles: Mapping, overheads: Overheads, indices: Sequence[int],
                     checks: Sequence[validate.Check], backend: validate.Backend) -> Table:
    model = validate.run_model(graph, cluster, profiles, overheads, backend)
    lat_p = [c.predicted.latency for c in checks]
    lat_m = [c.measured.latency for c in checks]
    mem_p = [max(validate.model_memory(model, c.predicted)) for c in checks]
    mem_m = [max(c.measured.memory) for c in checks]
    where = "emulated speeds and links" if backend is validate.Backend.EMULATED else "this machine, loopback"
    title = (f"predicted (for the run: {where}) against measured ({backend.value}); latency rank correlation "
             f"{validate.spearman(lat_p, lat_m):.2f}, median error {validate.median_abs_error(lat_p, lat_m):.1%}; "
             f"memory {validate.spearman(mem_p, mem_m):.2f}, {validate.median_abs_error(mem_p, mem_m):.1%}")
    table = Table(title=title)
    for col in ("point", "latency ms predicted", "measured", "max model MiB predicted", "measured"):
        table.add_column(col, justify="right")
    for i, lp, lm, mp, mm in zip(indices, lat_p, lat_m, mem_p, mem_m):
        table.add_row(f"#{i}", f"{lp * 1e3:.2f}", f"{lm * 1e3:.2f}", _mib(mp), _mib(mm))
    return table
