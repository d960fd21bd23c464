"""The command line, thin over the library. User errors print a message and exit 2, never a traceback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console

from edgesplit.errors import EdgesplitError, InputError

_WIDTH = shutil.get_terminal_size((140, 40)).columns  # wide tables when output is not a terminal
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgesplitError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="edgesplit")
def main() -> None:
    """Split one ONNX model across several edge devices, run it, verify it."""


def _cluster(devices: int | None, cluster: Path | None):
    from edgesplit.cluster import Cluster

    if (devices is None) == (cluster is None):
        raise EdgesplitError("expected exactly one of --devices N or --cluster cluster.yaml")
    return Cluster.load(cluster) if cluster else Cluster.simulated(devices)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"expected an .npz file of inputs keyed by the model's input names, {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable .npz file: {exc}") from None


def _dims(values: tuple[str, ...]) -> dict[str, int]:
    dims = {}
    for v in values:
        name, _, size = v.partition("=")
        if not name or not size.isdigit():
            raise EdgesplitError(f"expected --dim NAME=SIZE (e.g. --dim batch=1), got {v!r}")
        dims[name] = int(size)
    return dims


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--dim", "dims", multiple=True, help="Size of a symbolic dimension for byte counts, NAME=SIZE.")
def inspect(source: Path, as_json: bool, dims: tuple[str, ...]) -> None:
    """Show the layers of a model (or the stages of a plan directory)."""
    from edgesplit import report

    if source.is_dir():
        from edgesplit.plan import Plan

        plan = Plan.load(source)
        if as_json:
            click.echo(json.dumps({"devices": report.device_summary(plan), **plan.to_dict()}, indent=1))
        else:
            console.print(report.plan_table(plan))
            console.print(report.transfer_table(plan))
        return
    from edgesplit.graph import load

    graph = load(source, dims=_dims(dims))
    if as_json:
        click.echo(json.dumps({
            "model": graph.name, "sha256": graph.sha256, "layers": report.graph_rows(graph),
            "totals": {"layers": len(graph.layers), "params": graph.total_params, "macs": graph.total_macs,
                       "param_bytes": graph.total_param_bytes},
        }, indent=1))
    else:
        console.print(report.graph_table(graph))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--devices", type=click.IntRange(min=1), help="Number of identical simulated devices.")
@click.option("--cluster", type=click.Path(path_type=Path), help="Cluster YAML describing the devices.")
@click.option("--mapping", type=click.Path(path_type=Path), help="Mapping JSON (AutoDiCE) or YAML; default: automatic.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Plan directory to write.")
@click.option("--dim", "dims", multiple=True, help="Size of a symbolic dimension for byte counts, NAME=SIZE.")
def partition(model: Path, devices: int | None, cluster: Path | None, mapping: Path | None, output: Path,
              dims: tuple[str, ...]) -> None:
    """Split MODEL over devices and write a plan directory."""
    from edgesplit import report
    from edgesplit.graph import load
    from edgesplit.pipeline import partition as do_partition
    from edgesplit.place import load_mapping

    the_cluster = _cluster(devices, cluster)
    the_mapping = load_mapping(mapping) if mapping else None
    graph = load(model, dims=_dims(dims))
    plan = do_partition(graph, the_cluster, the_mapping)
    plan.save(output)
    console.print(report.plan_table(plan))
    console.print(f"wrote {output}/plan.json and {len(plan.stages)} stage files")


@main.command()
@click.argument("plan_dir", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True, help=".npz keyed by input names.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help=".npz to write the outputs to.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads per stage.")
def run(plan_dir: Path, input_path: Path, output: Path, threads: int | None) -> None:
    """Run a plan in-process on the inputs of an .npz file."""
    from edgesplit.plan import Plan
    from edgesplit.runtime.local import LocalExecutor

    plan = Plan.load(plan_dir)
    result = LocalExecutor(plan, threads=threads).run(_read_npz(input_path))
    tmp = output.with_name(output.name + ".tmp.npz")
    np.savez(tmp, **result.outputs)
    tmp.replace(output)
    console.print(f"wrote {', '.join(result.outputs)} to {output}")


@main.command()
@click.argument("plan_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="Source model (default: the one recorded).")
@click.option("--input", "input_path", type=click.Path(path_type=Path), help=".npz inputs (default: random).")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="Relative tolerance (max error / max |ref|).")
@click.option("--dim", "dims", multiple=True, help="Size of a symbolic dimension for random inputs, NAME=SIZE.")
def verify(plan_dir: Path, model_path: Path | None, input_path: Path | None, rtol: float, dims: tuple[str, ...]) -> None:
    """Compare a plan's outputs with the whole source model's."""
    from rich.table import Table

    from edgesplit.graph import load
    from edgesplit.pipeline import verify as do_verify
    from edgesplit.plan import Plan
    from edgesplit.runtime.common import random_inputs

    plan = Plan.load(plan_dir)
    source = model_path or _recorded_model(plan_dir, plan)
    graph = load(source)
    if graph.sha256 != plan.model_sha256:
        raise EdgesplitError(f"{source} is not the model this plan was made from (sha256 {graph.sha256[:12]}…, "
                             f"plan expects {plan.model_sha256[:12]}…)")
    inputs = _read_npz(input_path) if input_path else random_inputs(plan.inputs, _dims(dims))
    diffs = do_verify(plan, graph, inputs, rtol=rtol)
    table = Table(title=f"plan vs whole model (rtol {rtol:g})")
    for col in ("output", "max abs diff", "max rel diff", "ok"):
        table.add_column(col)
    for d in diffs:
        table.add_row(d.output, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}", "[green]yes[/]" if d.ok else "[red]NO[/]")
    console.print(table)
    if not all(d.ok for d in diffs):
        sys.exit(1)


def _recorded_model(plan_dir: Path, plan) -> Path:
    recorded = json.loads((plan_dir / "plan.json").read_text())["model"].get("path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    raise EdgesplitError(f"the plan does not say where its source model is; give it with --model MODEL.onnx")


@main.command()
@click.option("--devices", type=click.IntRange(min=1), default=3, show_default=True)
def demo(devices: int) -> None:
    """Split the shipped MNIST CNN over simulated devices; compare accuracy unsplit and split."""
    from edgesplit.demo import run_demo

    run_demo(devices=devices, console=console)


if __name__ == "__main__":
    main()
