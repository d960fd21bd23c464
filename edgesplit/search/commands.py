"""`edgesplit profile` and `edgesplit search`: thin over edgesplit.search."""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger("edgesplit")
_MODEL = click.argument("model", type=click.Path(path_type=Path))
_DEVICES = click.option("--devices", type=click.IntRange(min=1), help="Number of identical simulated devices.")
_CLUSTER = click.option("--cluster", type=click.Path(path_type=Path), help="Cluster YAML describing the devices.")
_DIM = click.option("--dim", "dims", multiple=True, help="Size of a symbolic dimension, NAME=SIZE.")


def _given(graph, cluster, files: tuple[Path, ...]) -> dict:
    """Profiles measured elsewhere: one measured on a device (`edgesplit profile --address`) is that device's, one
    of a kind (`edgesplit profile` on a board) is for the devices with its threads."""
    from edgesplit.errors import InputError
    from edgesplit.search.profile import check_profile, kind, load_profile

    found = {}
    cores = sorted({d.cores for d in cluster.devices})
    for path in files:
        p = load_profile(path)
        check_profile(p, graph, p.threads, str(path))
        if p.device:
            if p.device not in cluster.names:
                raise InputError(f"{path}: a profile measured on device {p.device!r}; expected one of the cluster's "
                                 f"devices {list(cluster.names)}")
            found[p.device] = p
        elif p.threads not in cores:
            raise InputError(f"{path}: a profile of device kind {kind(p.threads)}; expected one of the cluster's "
                             f"kinds {[kind(c) for c in cores]} (a device's kind is its cores)")
        else:
            found[p.threads] = p
    return found


def _profiles(graph, cluster, dims, repeats: int = 10, refresh: bool = False, given: dict | None = None):
    """One profile per device kind of the cluster (or per device, where measured on it): given, else measured here
    (a progress bar) or cached."""
    from rich.progress import Progress

    from edgesplit.cli import err_console
    from edgesplit.search.profile import kind, profile, threads_of

    given = given or {}
    rest = [d for d in cluster.devices if d.name not in given and d.cores not in given]
    kinds = sorted({threads_of(d.cores) for d in rest})
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("profiling", total=2 * len(kinds))
        found = {t: profile(graph, t, repeats, not refresh, lambda: progress.advance(task), dims) for t in kinds}
    here = [d.name for d in rest if d.speed != 1.0]
    if kinds:
        log.info(f"profiled {', '.join(kind(t) for t in kinds)} on this machine"
                 + (f"; {here} are scaled by their speed (this machine: --host-speed, default 1.0)" if here else ""))
    return found | given


@click.command("profile")
@_MODEL
@_DEVICES
@_CLUSTER
@_DIM
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Profiled runs per kind.")
@click.option("--refresh", is_flag=True, help="Measure again even when a cached profile matches.")
@click.option("--address", default=None,
              help="Ray head HOST:PORT: profile on each device itself and measure every link between them.")
@click.option("--links", "links_out", type=click.Path(path_type=Path),
              help="With --address: where to write the cluster with its measured links (default: "
                   "CLUSTER.measured.yaml beside the cluster file, else ./cluster.measured.yaml).")
def profile_command(model: Path, devices: int | None, cluster: Path | None, dims: tuple[str, ...], repeats: int,
                    refresh: bool, address: str | None, links_out: Path | None) -> None:
    """Per-layer latency of MODEL on each device kind of the cluster (cached beside the model); with --address, on
    each device of a Ray cluster, and the links between them."""
    from rich.table import Table

    from edgesplit.cli import _cluster, _dims, console
    from edgesplit.errors import InputError
    from edgesplit.graph import load
    from edgesplit.search.profile import cache_path, for_device, kind, speed_factor

    if links_out is not None and address is None:
        raise InputError("--links names where the measured links go; expected --address with it")
    the_cluster = _cluster(devices, cluster)
    graph = load(model, dims=_dims(dims))
    if address is not None:
        links_out = links_out or (cluster.with_name(f"{cluster.stem}.measured.yaml") if cluster else
                                  Path("cluster.measured.yaml"))
        found, the_cluster = _on_devices(graph, the_cluster, address, _dims(dims), repeats, links_out)
    else:
        found = _profiles(graph, the_cluster, _dims(dims), repeats, refresh)
    table = Table(title=f"{graph.name}: {len(graph.layers)} layers")
    for col in ("device", "measured on", "kind", "speed", "whole model (ms)", "sum of layers (ms)", "slowest layer"):
        table.add_column(col)
    for d in the_cluster.devices:
        p = for_device(found, d)
        f = speed_factor(p, d, 1.0)
        slowest = max(range(len(graph.layers)), key=lambda i: p.layer_seconds[i])
        table.add_row(d.name, "itself" if p.device else "this machine", kind(p.threads), f"{d.speed:g}",
                      f"{p.whole_seconds * 1e3 * f:.3f}", f"{sum(p.layer_seconds) * 1e3 * f:.3f}",
                      f"{graph.layers[slowest].name} ({p.layer_seconds[slowest] * 1e3 * f:.3f} ms)")
    console.print(table)
    if address is None:
        for t in found:
            path = cache_path(graph, t, _dims(dims))
            if path is not None:
                console.print(f"cached {path}", markup=False, highlight=False, soft_wrap=True)


def _on_devices(graph, cluster, address: str, dims, repeats: int, links_out: Path):
    """Profiles measured on the devices and the cluster with its measured links, both written; prints the links."""
    import json

    import yaml
    from rich.progress import Progress
    from rich.table import Table

    from edgesplit.cli import console, err_console
    from edgesplit.cluster import describe_link
    from edgesplit.files import check_new_file, replace_files
    from edgesplit.search.profile import device_profile_path
    from edgesplit.search.remote import measure_on_devices, measured_cluster

    check_new_file(links_out, "--links")
    paths = {d: device_profile_path(graph, d, dims) for d in cluster.names}  # the model was loaded from a file
    k = len(cluster.devices)
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("profiling on the devices, then their links", total=k + k * (k - 1) // 2)
        found, links = measure_on_devices(graph, cluster, address, repeats, dims,
                                          on_step=lambda what: progress.advance(task))
    measured = measured_cluster(cluster, links)
    table = Table(title="links, measured between the devices' probes")
    for col in ("between", "declared", "measured"):
        table.add_column(col)
    for (a, b), link in links.items():
        table.add_row(f"{a} - {b}", describe_link(cluster.link(a, b)), describe_link(link))
    console.print(table)
    replace_files(Path(graph.path).parent, {paths[d].name: json.dumps(p.to_dict()).encode() for d, p in found.items()})
    replace_files(links_out.parent, {links_out.name: yaml.safe_dump(measured.to_dict(), sort_keys=False).encode()})
    for path in paths.values():
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {links_out} (the cluster with its measured links); search with them:\n  edgesplit search "
                  f"{graph.path} --cluster {links_out} " + " ".join(f"--profile {p}" for p in paths.values())
                  + " -o OUT", markup=False, highlight=False, soft_wrap=True)
    return found, measured


def _check_output(output: Path, force: bool) -> None:
    from edgesplit.errors import InputError

    if output.exists() and not output.is_dir():
        raise InputError(f"-o: expected a directory for the front and its plans, got the file {output}")
    if output.is_dir() and any(output.iterdir()):
        if not (output / "front.json").is_file():
            raise InputError(f"-o: expected a new or empty directory (or an earlier search's, with --force), but "
                             f"{output} holds other files")
        if not force:
            raise InputError(f"{output} already holds a search (front.json); pass --force to replace it (only "
                             "front.json, front.png and the plans it wrote are replaced)")


@click.command("search")
@_MODEL
@_DEVICES
@_CLUSTER
@_DIM
@click.option("--objectives", default="latency,memory", show_default=True,
              help="Comma-separated: latency, memory, energy, throughput, robustness.")
@click.option("--space", default="vertical", show_default=True,
              help="What the search may change: vertical (layer ranges), horizontal (neighbouring ranges joined into a "
                   "group that splits its layers by channels) and replication (standby copies of stages).")
@click.option("--generations", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--population", type=click.IntRange(min=4), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pick", "how", type=click.Choice(["latency", "throughput", "memory", "energy", "robustness", "knee"]),
              default="knee", show_default=True, help="Which front point is the default plan.")
@click.option("--plans", type=click.IntRange(min=1), default=8, show_default=True,
              help="Front points written as plan directories (spread over the front, the picked one always).")
@click.option("--validate", "validate_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run this many of the written plans for real and print predicted against measured.")
@click.option("--backend", type=click.Choice(["local", "ray", "emulated"]), default="local", show_default=True,
              help="The data plane whose overheads are measured and that --validate runs on (emulated: in-process, "
                   "devices slowed to their speed, links delayed).")
@click.option("--host-speed", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="This machine's speed in the cluster's units (the examples' are a Raspberry Pi 4 = 1.0).")
@click.option("--profile", "profile_files", multiple=True, type=click.Path(path_type=Path),
              help="A profile measured elsewhere: on a device (`edgesplit profile --address`), for that device; of a "
                   "kind (`edgesplit profile` on a board), for the devices of its cores.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Directory to write.")
@click.option("--force", is_flag=True, help="Replace an earlier search in --output.")
@click.option("--key-file", type=click.Path(path_type=Path), help="The key plans are signed with.")
def search_command(model: Path, devices: int | None, cluster: Path | None, dims: tuple[str, ...], objectives: str,
                   space: str, generations: int, population: int, seed: int, how: str, plans: int,
                   validate_k: int, backend: str, host_speed: float, profile_files: tuple[Path, ...], output: Path,
                   force: bool, key_file: Path | None) -> None:
    """NSGA-II over layouts of MODEL on the cluster, scored by the cost model; writes the front and its plans."""
    from edgesplit.cli import _cluster, _dims, signing_key
    from edgesplit.errors import InputError
    from edgesplit.graph import load
    from edgesplit.search import front, validate
    from edgesplit.search.cost import CostModel
    from edgesplit.search.nsga import Objective, Pick

    goals = front.parse_names(Objective, objectives, "--objectives")
    spaces = front.parse_names(front.Space, space, "--space")
    front.check_spaces(spaces)
    if validate_k and profile_files:
        raise InputError("--validate runs the plans on this machine and checks its own profiles; expected no "
                         "--profile with it")
    if validate_k > plans:
        raise InputError(f"--validate {validate_k}: expected at most the {plans} plans written (--plans)")
    _check_output(output, force)
    find_key = signing_key if key_file is None else (lambda: signing_key(key_file))
    key = find_key()
    the_cluster = _cluster(devices, cluster)
    graph = load(model, dims=_dims(dims))
    front.check_fits(graph, the_cluster)
    profiles = _profiles(graph, the_cluster, _dims(dims), given=_given(graph, the_cluster, profile_files))
    overheads = validate.overheads(validate.Backend(backend))
    cost_model = CostModel(graph, the_cluster, profiles, overheads, host_speed)
    result, bases, chosen, why = _search(cost_model, goals, population, generations, seed, Pick(how),
                                         front.Space.REPLICATION in spaces, front.Space.HORIZONTAL in spaces)
    if validate_k > len(result.front):
        raise InputError(f"--validate {validate_k}: the front has only {len(result.front)} point(s); expected at most "
                         "that many (nothing was written)")
    indices = front.spread(len(result.front), plans, chosen)
    built = _plans(graph, the_cluster, [result.front[i].layout for i in indices], cost_model, _dims(dims))
    checks = _validate(graph, the_cluster, profiles, result, indices, validate_k, chosen, backend, overheads,
                       _dims(dims))
    outcome = front.Outcome(result, bases, chosen, why, checks)
    _write(output, force, key, cost_model, outcome, goals, profiles, overheads, dict(zip(indices, built)), backend)


def _search(cost_model, goals, population, generations, seed, how, standbys, horizontal):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgesplit.cli import console, err_console
    from edgesplit.search import front, report

    columns = (TextColumn("searching"), BarColumn(), MofNCompleteColumn(), TextColumn("generations"),
               TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("search", total=generations)
        result, bases, chosen, why = front.run_search(cost_model, goals, population, generations, seed, how,
                                                      lambda: progress.advance(task), standbys, horizontal)
    console.print(report.front_table(cost_model, result, bases, goals, chosen))
    console.print(f"{result.evaluations} layouts scored in {result.seconds:.1f} s; picked #{chosen}: {why}",
                  markup=False, highlight=False, soft_wrap=True)
    return result, bases, chosen, why


def _plans(graph, cluster, layouts, cost_model, dims):
    from edgesplit.runtime.stages import check_loadable
    from edgesplit.search.space import to_plan

    built = [to_plan(graph, cluster, v, cost_model.splits if v.horizontal else None, dims) for v in layouts]
    for p in built:
        check_loadable(p)
    return built


def _validate(graph, cluster, profiles, result, indices, k, chosen, backend, overheads, dims):
    from rich.progress import Progress

    from edgesplit.cli import console, err_console
    from edgesplit.search import front, report, validate

    if k == 0:
        return {}
    picked = [indices[i] for i in front.spread(len(indices), k, indices.index(chosen))]
    threads = min(profiles)
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task(f"running {len(picked)} plans ({backend})", total=len(picked))
        checks = validate.check(graph, cluster, profiles, [result.front[i].layout for i in picked],
                                validate.Backend(backend), threads, base=overheads, dims=dims,
                                on_step=lambda: progress.advance(task))
    console.print(report.validation_table(graph, cluster, profiles, overheads, picked, checks,
                                          validate.Backend(backend)))
    return dict(zip(picked, checks))


def _write(output, force, key, cost_model, outcome, goals, profiles, overheads, plans, backend) -> None:
    from edgesplit.cli import console
    from edgesplit.search import front

    output.mkdir(parents=True, exist_ok=True)
    (output / "plans").mkdir(exist_ok=True)
    _remove_earlier_plans(output, {f"plans/p{i:03d}" for i in plans})
    written = {}
    for i, p in plans.items():
        directory = output / "plans" / f"p{i:03d}"
        p.save(directory, force=force, key=key)
        written[i] = str(directory.relative_to(output))
    front.plot(output / "front.png", outcome.result.front, outcome.bases, goals, outcome.chosen)
    doc = front.document(cost_model, outcome, goals, profiles, overheads, written, backend)
    front.write_json(output / "front.json", doc)
    console.print(f"wrote {output}/front.json, front.png and {len(written)} plans; the picked plan is "
                  f"{output}/{written[outcome.chosen]}", markup=False, highlight=False, soft_wrap=True)


def _remove_earlier_plans(output: Path, kept: set[str]) -> None:
    """An earlier search's plans that this one does not write again: their plan files go (nothing else)."""
    import json

    from edgesplit.plandir import owned_files

    try:
        earlier = json.loads((output / "front.json").read_text())["front"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for point in earlier if isinstance(earlier, list) else []:
        name = point.get("plan") if isinstance(point, dict) else None
        if not isinstance(name, str) or name in kept or not name.startswith("plans/p") or "/.." in name:
            continue
        directory = output / name
        for file in owned_files(directory) if directory.is_dir() else ():
            (directory / file).unlink(missing_ok=True)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
