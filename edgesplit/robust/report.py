"""What `edgesplit robustness` shows and writes: a table, a JSON document, a plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from edgesplit.robust.evaluate import CodedMemory, Row, Study
from edgesplit.robust.frontier import Front
from edgesplit.robust.policies import Policy


def table(rows: Sequence[Row], study: Study) -> Table:
    sizes = list(study.sets)
    title = f"{study.metric.value} on {len(study.samples)} samples under failures"
    if study.fatal:
        title += f" (not failed: {', '.join(study.fatal)}, whose loss is fatal)"
    out = Table(title=title)
    compared = any(r.importance for r in rows)
    for col in ("policy", *(("importance",) if compared else ()), "r", "memory vs plain", "MACs vs plain",
                "fault-free"):
        out.add_column(col, justify="left" if col == "policy" else "right")
    for k in sizes:
        out.add_column(f"{k} failed: mean", justify="right")
        out.add_column(f"{k} failed: worst", justify="right")
    perplexity = all(r.perplexity for r in rows)
    if perplexity:
        out.add_column("perplexity", justify="right")
        for k in sizes:
            out.add_column(f"{k} failed: mean / worst", justify="right")
    for row in rows:
        cells = [row.policy.value, *((row.importance or "-",) if compared else ()), f"{row.r:g}",
                 f"{row.memory_vs_plain:.3f}", f"{row.macs_vs_plain:.3f}", f"{row.fault_free:.4f}"]
        cells += [c for k in sizes for c in (f"{row.mean(k):.4f}", f"{row.worst(k):.4f}")]
        if perplexity:
            cells += [f"{row.perplexity[()]:.2f}"]
            cells += [f"{row.mean_perplexity(k):.2f} / {row.worst_perplexity(k):.2f}" for k in sizes]
        out.add_row(*cells)
    return out


def coded_line(memory: CodedMemory) -> str:
    return (f"parity: {len(memory.regions)} coded region(s); their max per-device parameter memory is "
            f"{memory.ratio:.3f}x the plain split's (N/(N-1) = {memory.bound:.3f})")


def document(rows: Sequence[Row], study: Study, model: str, importance: str) -> dict[str, Any]:
    return {"model": model, "metric": study.metric.value, "importance": importance, "samples": len(study.samples),
            "devices": list(study.cluster.names), "fatal_devices": list(study.fatal),
            "failure_sizes": list(study.sets), "rows": [r.to_dict() for r in rows]}


def front_table(front: Front) -> Table:
    gain = front.gain()
    title = (f"--search ({front.policy.value}): {len(front.points)} front points of {front.evaluations} fraction "
             f"vectors in {front.seconds:.1f} s; " +
             (f"best gain over uniform r at no more memory: {gain['gain']:+.4f} at {gain['memory_vs_plain']:.3f}x"
              if gain else "no uniform point to compare"))
    out = Table(title=title)
    for col in ("memory vs plain", "MACs vs plain", "1 failed: mean", "1 failed: worst", "fractions"):
        out.add_column(col, justify="left" if col == "fractions" else "right")
    for p in front.points:
        values = " ".join(f"{front.grid[v]:g}" for v in p.levels)
        out.add_row(f"{p.memory_vs_plain:.3f}", f"{p.macs_vs_plain:.3f}", f"{p.mean:.4f}", f"{p.worst:.4f}", values)
    return out


def plot(rows: Sequence[Row], study: Study, path: Path, front: Front | None = None) -> None:
    """The metric under single failures (mean) against memory_vs_plain, one curve per policy (and the searched
    front beside the uniform-r curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1 if 1 in study.sets else min(study.sets)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for policy, method in dict.fromkeys((r.policy, r.importance) for r in rows):
        points = [(r.memory_vs_plain, r.mean(size)) for r in sorted(rows, key=lambda r: r.r)
                  if r.policy is policy and r.importance == method]
        style = {Policy.NONE: dict(marker="s", ms=9), Policy.FULL: dict(marker="*", ms=13),
                 Policy.PARITY: dict(marker="D", ms=8)}.get(policy, {"marker": "o"})
        label = _label(policy) + (f" ({method})" if method else "")
        ax.plot(*zip(*points), label=label, linestyle="-" if len(points) > 1 else "none", **style)
    if front is not None:
        ax.plot([p.memory_vs_plain for p in front.points], [p.mean for p in front.points], marker="^",
                linestyle="--", color="black", label=f"{front.policy.value}, searched per-region r (NSGA-II)")
    ax.set_xlabel("max per-device parameter memory / plain split's")
    ax.set_ylabel(f"{study.metric.value}, mean over {size}-device failures")
    ax.set_title(f"robustness vs memory ({len(study.cluster.names)} devices)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(policy: Policy) -> str:
    return {Policy.NONE: "none (plain split)", Policy.FULL: "full replication"}.get(policy, policy.value)
