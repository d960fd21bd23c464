"""The command line, thin over the library. User errors print a message and exit 2, never a traceback."""

from __future__ import annotations

import sys

try:  # a Ctrl-C while these load (seconds on a small board) ends with one line, not a traceback
    import json
    import logging
    import shutil
    import warnings
    from pathlib import Path

    import click
    from rich.console import Console
    from rich.text import Text

    from edgesplit.errors import EdgesplitError, EdgesplitWarning
    from edgesplit.files import save_npz
    from edgesplit.layout import Backend, Dataplane, KvCache, SplitFamily, Strategy, Sync
    from edgesplit.runtime.streamio import check_answers_path, read_npz
except KeyboardInterrupt:
    sys.stderr.write("edgesplit: interrupted (Ctrl-C) while starting; nothing was done\n")
    raise SystemExit(130) from None

_WIDTH = shutil.get_terminal_size((140, 40)).columns  # wide tables when output is not a terminal
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)


def say(target: Console, label: str, style: str, message: str) -> None:
    """Print `label` styled and `message` exactly as written (never read as rich markup)."""
    target.print(Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True)


def _warning_printer(original):
    """edgesplit's warnings as one line each, exactly as written; other libraries' as before."""
    def show(message, category, *where) -> None:
        if issubclass(category, EdgesplitWarning):
            say(err_console, "warning:", "bold yellow", str(message))
        else:
            original(message, category, *where)
    return show


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            warnings.simplefilter("default", EdgesplitWarning)
            warnings.showwarning = _warning_printer(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except EdgesplitError as exc:
                say(err_console, "error:", "bold red", str(exc))
                sys.exit(2)
            except KeyboardInterrupt:
                say(err_console, "interrupted:", "bold red", "stopped by Ctrl-C")
                sys.exit(130)


class _Notes(logging.Handler):
    """edgesplit's notes (INFO) and warnings, one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        warning = record.levelno >= logging.WARNING
        say(err_console, "warning:" if warning else "note:", "yellow" if warning else "cyan", record.getMessage())


@click.group(cls=_Group)
@click.version_option(package_name="edgesplit")
def main() -> None:
    """Split one ONNX model across several edge devices, run it, verify it."""
    log = logging.getLogger("edgesplit")
    if not any(isinstance(h, _Notes) for h in log.handlers):
        log.addHandler(_Notes())
        log.setLevel(logging.INFO)


def _cluster(devices: int | None, cluster: Path | None):
    from edgesplit.cluster import Cluster

    if (devices is None) == (cluster is None):
        raise EdgesplitError("expected exactly one of --devices N or --cluster cluster.yaml (or platform.txt)")
    if cluster and cluster.suffix == ".txt" and cluster.is_file():
        from edgesplit.platforms import describe, load_platform

        found = load_platform(cluster)
        logging.getLogger("edgesplit").info(describe(found, f"AutoDiCE platform file {cluster}"))
        return found
    return Cluster.load(cluster) if cluster else Cluster.simulated(devices)


def _cluster_from(mapping: object):
    """Without --devices or --cluster: the devices the mapping's keys describe (AutoDiCE's host_resource keys)."""
    from edgesplit.place.autodice import cluster_from_mapping
    from edgesplit.platforms import describe

    found = cluster_from_mapping(mapping)
    logging.getLogger("edgesplit").info(describe(found, "the mapping's keys"))
    return found


def _dims(values: tuple[str, ...]) -> dict[str, int]:
    dims = {}
    for v in values:
        name, _, size = v.partition("=")
        if not name or not size.isdigit():
            raise EdgesplitError(f"expected --dim NAME=SIZE (e.g. --dim batch=1), got {v!r}")
        dims[name] = int(size)
    return dims


_KEY_FILE = click.option("--key-file", type=click.Path(path_type=Path),
                         help="The key plans are signed with (default: $EDGESPLIT_KEY_FILE, else the Ray auth token).")


def _signed_plans(f):
    """--key-file and --trust-unsigned, for commands that load a plan."""
    f = click.option("--trust-unsigned", is_flag=True,
                     help="Load a plan that is unsigned or not signed with the key (only one you trust).")(f)
    return _KEY_FILE(f)


def signing_key(key_file: Path | None = None):
    """The key plans are signed with; on a first plan on this machine, the cluster key a local Ray instance uses."""
    from edgesplit.signing import find_key

    key = find_key(key_file)
    if key is None:
        from edgesplit.runtime.raynodes import ensure_token

        created = ensure_token()
        key = find_key() or find_key(Path(created))
        logging.getLogger("edgesplit").info(
            f"no key found (--key-file, $EDGESPLIT_KEY_FILE, Ray auth token): created the cluster key {created} "
            f"(mode 600), which a local Ray instance and `edgesplit device head` use too")
    return key


def _load_plan(plan_dir: Path, key_file: Path | None, trust_unsigned: bool):
    from edgesplit.plan import Plan
    from edgesplit.signing import find_key

    return Plan.load(plan_dir, key=find_key(key_file), trust_unsigned=trust_unsigned)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--dim", "dims", multiple=True, help="Size of a symbolic dimension for byte counts, NAME=SIZE.")
@_signed_plans
def inspect(source: Path, as_json: bool, dims: tuple[str, ...], key_file: Path | None, trust_unsigned: bool) -> None:
    """Show the layers of a model (or the stages of a plan directory)."""
    from edgesplit import report

    if source.is_dir():
        plan = _load_plan(source, key_file, trust_unsigned)
        if as_json:
            click.echo(json.dumps({"devices": report.device_summary(plan), "region_summary": report.region_rows(plan),
                                   **plan.to_dict()}, indent=1))
        else:
            console.print(report.plan_table(plan))
            console.print(report.transfer_table(plan))
            if plan.regions:
                console.print(report.region_table(plan))
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
@click.option("--horizontal", type=click.Path(path_type=Path),
              help="AutoDiCE horizontal.json for a hybrid pair with --mapping (split layers listed under every device).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Plan directory to write.")
@click.option("--dim", "dims", multiple=True, help="Size of a symbolic dimension for byte counts, NAME=SIZE.")
@click.option("--kv-cache", type=click.Choice(KvCache.names()), default="gather", show_default=True,
              help="strategy heads, decoder with a KV cache: gather keeps the model interface, shard keeps each device its heads' cache.")
@click.option("--strategy", type=click.Choice(Strategy.names()), default="vertical", show_default=True,
              help="vertical: layer ranges per device; horizontal: split layers across devices; hybrid: both; "
                   "heads: Transformers by attention heads, MLP neurons and vocabulary.")
@click.option("--split", "split", type=click.Choice(SplitFamily.names()), default="auto", show_default=True,
              help="How horizontal regions split layers when chosen automatically.")
@click.option("--sync", type=click.Choice(Sync.names()), default="exchange", show_default=True,
              help="Split regions: gather sends the parts to one device that combines them and sends the result on; "
                   "exchange sends each part to every device that reads the result, and each combines it itself "
                   "(one hop per synchronisation instead of two).")
@click.option("--force", is_flag=True, help="Replace the plan already in --output (other files there are kept).")
@click.option("--standby", "standby", multiple=True, metavar="auto|STAGE=DEVICE|DEVICE=DEVICE",
              help="Standby copies of stages on other devices, run while a stage's device is down or late: auto "
                   "(every stage, on the device with the most memory to spare), or by hand. Repeatable.")
@_KEY_FILE
def partition(model: Path, devices: int | None, cluster: Path | None, mapping: Path | None, horizontal: Path | None,
              output: Path, dims: tuple[str, ...], strategy: str, split: str, sync: str, kv_cache: str, force: bool,
              standby: tuple[str, ...], key_file: Path | None) -> None:
    """Split MODEL over devices and write a plan directory."""
    from edgesplit import report
    from edgesplit.graph import load
    from edgesplit.planner import partition as do_partition
    from edgesplit.place import load_mapping
    from edgesplit.plandir import check_target
    from edgesplit.runtime.stages import check_loadable
    from edgesplit.signing import find_key

    if horizontal and not mapping:
        raise EdgesplitError("--horizontal FILE is one half of AutoDiCE's hybrid pair: expected --mapping FILE too")
    check_target(output, force)
    key = find_key(key_file)
    the_cluster = _cluster(devices, cluster) if devices or cluster or not mapping else None
    the_mapping = load_mapping(mapping) if mapping else None
    graph = load(model, dims=_dims(dims))
    if horizontal:
        from edgesplit.place.autodice import merge_hybrid

        the_mapping = merge_hybrid(the_mapping, load_mapping(horizontal), graph)
    the_cluster = the_cluster or _cluster_from(the_mapping)
    plan = do_partition(graph, the_cluster, the_mapping, strategy=strategy, split=split, dims=_dims(dims),
                        kv_cache=kv_cache, standby=standby, sync=sync)
    check_loadable(plan)
    key = key or signing_key()
    plan.save(output, force=force, key=key)
    logging.getLogger("edgesplit").info(f"signed the plan (plan.sig) with {key.describe()}")
    console.print(report.plan_table(plan))
    if plan.regions:
        console.print(report.region_table(plan))
    console.print(f"wrote {output}/plan.json and {len(plan.stages)} stage files", markup=False, highlight=False,
                  soft_wrap=True)
    for s in plan.standbys:
        console.print(f"standby: stage {s.stage} also on {s.device}", markup=False, highlight=False)


@main.command()
@click.argument("plan_dir", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path), help=".npz keyed by input names.")
@click.option("--stream", "stream_path", type=click.Path(path_type=Path),
              help="Many requests: an .npz with a leading request axis, or a directory of .npz files.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help=".npz to write the outputs to.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads per stage.")
@click.option("--backend", type=click.Choice(Backend.names()), default="local", show_default=True)
@click.option("--address", default=None, help="Ray head HOST:PORT (ray backend; default: a local Ray instance).")
@click.option("--allow-degraded", is_flag=True, help="Answer with zeros for parts on dead devices (marked degraded).")
@click.option("--deadline", type=float, default=30.0, show_default=True,
              help="ray: seconds a request may take; a device still working then is routed around for it (replica, "
                   "or fill with --allow-degraded) without being declared dead, so answers come within the deadline "
                   "plus about 1 s.")
@click.option("--dataplane", type=click.Choice(Dataplane.names()), default="auto", show_default=True,
              help="ray: actor calls, Ray Compiled Graphs, the peer mesh (devices exchange tensors directly, one call "
                   "per device per request), or measure them on the first request and keep the fastest.")
@click.option("--chunk", type=click.IntRange(min=1), default=1, show_default=True,
              help="ray: requests sent through each device per call; more divides Ray's per-call cost (throughput), "
                   "and each chunk of N gets N times the deadline.")
@click.option("--start-timeout", type=click.FloatRange(min=0, min_open=True), default=180.0, show_default=True,
              help="ray: seconds to wait for every device's actor to start (a note every 5 s says who is late).")
@click.option("--replan-after", type=click.FloatRange(min=0), default=None,
              help="ray: when a device stays down this many seconds, search a plan for the devices left and go on "
                   "with it (requests the old plan could not answer are sent again, none twice).")
@click.option("--replan-pick", type=click.Choice(["latency", "throughput", "memory", "energy", "knee"]),
              default=None, help="--replan-after: which point of the survivors' front to go on with [default: "
                                 "latency].")
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="--replan-after: the plan's source model (default: the one recorded).")
@_signed_plans
def run(plan_dir: Path, input_path: Path | None, stream_path: Path | None, output: Path, threads: int | None,
        backend: str, address: str | None, allow_degraded: bool, deadline: float, dataplane: str, chunk: int,
        start_timeout: float, replan_after: float | None, replan_pick: str | None, model_path: Path | None,
        key_file: Path | None, trust_unsigned: bool) -> None:
    """Run a plan on one request (--input) or stream many (--stream), in-process or on Ray."""
    from edgesplit.runtime.local import LocalExecutor
    from edgesplit.signing import find_key

    if (input_path is None) == (stream_path is None):
        raise EdgesplitError("expected exactly one of --input FILE.npz or --stream FILE.npz|DIR")
    if replan_after is not None and backend != Backend.RAY:
        raise EdgesplitError(f"--replan-after re-plans around devices lost on Ray; expected --backend ray, got "
                             f"--backend {backend}")
    if model_path is not None and replan_after is None:
        raise EdgesplitError("--model is the source model for --replan-after; expected --replan-after with it")
    if replan_pick is not None and replan_after is None:
        raise EdgesplitError("--replan-pick says which re-plan to go on with; expected --replan-after with it")
    check_answers_path(output)
    plan = _load_plan(plan_dir, key_file, trust_unsigned)
    replanner = None
    if replan_after is not None:
        from edgesplit.search.nsga import Pick
        from edgesplit.search.replan import Replanner, objectives_for

        graph = _source_graph(plan_dir, plan, model_path)
        pick = Pick(replan_pick or "latency")
        # profiled now: a loss then costs only the search
        replanner = Replanner(graph, plan.cluster, objectives_for(pick), pick)
    if stream_path is not None or backend == Backend.RAY:
        from edgesplit.runtime import streamio

        requests = streamio.read_requests(stream_path) if stream_path else [read_npz(input_path)]
        streamio.check_requests(plan, requests)
        answers, report = streamio.run_stream(plan, requests, console, backend, address, threads, allow_degraded,
                                              deadline, dataplane, chunk, start_timeout, find_key(key_file),
                                              trust_unsigned, replanner, replan_after)
        streamio.write_answers(output, plan, answers, stacked=stream_path is not None)
        for message, count in streamio.describe_failures(answers).items():
            say(err_console, f"{count} request(s) failed:", "red", message)
        console.print(f"wrote {output}; {report.summary()}", markup=False, highlight=False, soft_wrap=True)
        if report.failed:
            sys.exit(1)
        return
    result = LocalExecutor(plan, threads=threads).run(read_npz(input_path))
    save_npz(output, result.outputs, "-o")
    console.print(f"wrote {', '.join(result.outputs)} to {output}", markup=False, highlight=False, soft_wrap=True)


@main.command()
@click.argument("plan_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="Source model (default: the one recorded).")
@click.option("--input", "input_path", type=click.Path(path_type=Path), help=".npz inputs (default: random).")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="Relative tolerance (max error / max |ref|).")
@click.option("--dim", "dims", multiple=True, help="Size of a symbolic dimension for random inputs, NAME=SIZE.")
@_signed_plans
def verify(plan_dir: Path, model_path: Path | None, input_path: Path | None, rtol: float, dims: tuple[str, ...],
           key_file: Path | None, trust_unsigned: bool) -> None:
    """Compare a plan's outputs with the whole source model's."""
    from rich.table import Table

    from edgesplit.runtime.local import verify as do_verify
    from edgesplit.runtime.common import random_inputs

    plan = _load_plan(plan_dir, key_file, trust_unsigned)
    graph = _source_graph(plan_dir, plan, model_path)
    inputs = read_npz(input_path) if input_path else random_inputs(plan.inputs, _dims(dims))
    diffs = do_verify(plan, graph, inputs, rtol=rtol)
    table = Table(title=f"plan vs whole model (rtol {rtol:g})")
    for col in ("output", "max abs diff", "max rel diff", "ok"):
        table.add_column(col)
    for d in diffs:
        table.add_row(d.output, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}", "[green]yes[/]" if d.ok else "[red]NO[/]")
    console.print(table)
    if not all(d.ok for d in diffs):
        sys.exit(1)


@main.command()
@click.argument("plan_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="Directory with tokenizer.json (default: the plan directory, then next to the source model).")
@click.option("--backend", type=click.Choice(Backend.names()), default="local", show_default=True)
@click.option("--address", default=None, help="Ray head HOST:PORT (ray backend; default: a local Ray instance).")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads per stage.")
@click.option("--dataplane", type=click.Choice([d for d in Dataplane.names() if d != Dataplane.COMPILED]),
              default="auto", show_default=True,
              help="ray: peer (one call per device per token, devices exchange directly; what auto picks) or tasks "
                   "(one actor call per stage).")
@_signed_plans
def generate(plan_dir: Path, prompt: str, max_new_tokens: int, tokenizer: Path | None, backend: str,
             address: str | None, threads: int | None, dataplane: str, key_file: Path | None,
             trust_unsigned: bool) -> None:
    """Greedy text generation with a decoder plan; each stage keeps its own KV cache."""
    from edgesplit.runtime.generate import find_tokenizer, generate as do_generate, load_tokenizer

    plan = _load_plan(plan_dir, key_file, trust_unsigned)
    tok = load_tokenizer(find_tokenizer(plan_dir, plan, tokenizer))
    gen = do_generate(plan, tok, prompt, max_new_tokens, threads=threads, backend=backend, address=address,
                      trust_unsigned=trust_unsigned, dataplane=dataplane)
    console.print(prompt, end="", markup=False, highlight=False)
    for token in gen:
        console.print(token.text, end="", markup=False, highlight=False)
    console.print()
    console.print(Text(gen.stats.summary(), style="bold"), highlight=False)


def _source_graph(plan_dir: Path, plan, model_path: Path | None):
    """The model the plan was made from: `model_path`, else the one plan.json records; checked by its sha256."""
    from edgesplit.graph import load

    source = model_path or _recorded_model(plan_dir, plan)
    graph = load(source)
    if graph.sha256 != plan.model_sha256:
        raise EdgesplitError(f"{source} is not the model this plan was made from (sha256 {graph.sha256[:12]}…, "
                             f"plan expects {plan.model_sha256[:12]}…)")
    return graph


def _recorded_model(plan_dir: Path, plan) -> Path:
    recorded = json.loads((plan_dir / "plan.json").read_text())["model"].get("path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    raise EdgesplitError("the plan does not say where its source model is; give it with --model MODEL.onnx")


@main.command()
@click.option("--devices", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--cluster", type=click.Path(path_type=Path), help="Cluster YAML (e.g. examples/mixed.yaml) instead of --devices.")
@click.option("--model", type=click.Choice(["mnist_cnn", "mnist_vit"]), default="mnist_cnn", show_default=True,
              help="Which shipped model to split.")
def demo(devices: int, cluster: Path | None, model: str) -> None:
    """Split a shipped MNIST model (CNN or ViT) over devices; compare test accuracy unsplit and split."""
    from edgesplit.demo import run_demo

    run_demo(devices=devices, console=console, cluster=cluster, model=model)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--devices", type=click.IntRange(min=1), help="Number of identical simulated devices.")
@click.option("--cluster", type=click.Path(path_type=Path), help="Cluster YAML describing the devices.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help=".npz keyed by the model's input names (leading sample axis), plus optional 'labels'.")
@click.option("--calibration", type=click.Path(path_type=Path), help=".npz for activation / ablation importance "
              "and mean fills (default: a separate first slice of --data).")
@click.option("--policy", "policies", default="none,full,random,vital,k-of-n", show_default=True,
              help="Comma-separated replication policies.")
@click.option("--r", "rs", default="0,0.1,0.25,0.5", show_default=True, help="Comma-separated vital fractions.")
@click.option("--importance", "importance_", default="weight", show_default=True,
              help="Comma-separated unit importance scores: weight (data-free), activation, ablation (measured "
                   "output change); several compare the ranked policies' rows.")
@click.option("--failures", default="1", show_default=True, help="Comma-separated failure-set sizes.")
@click.option("--strategy", type=click.Choice(["horizontal", "heads"]), default="horizontal", show_default=True)
@click.option("--metric", type=click.Choice(["accuracy", "agreement", "cosine", "next-token", "neighbours"]),
              default=None, help="Override the metric (default: accuracy with labels, else chosen from the output "
              "shape: next-token agreement, plus perplexity, for language-model logits; neighbours: the same nearest "
              "neighbour among the samples as the unsplit model's embeddings).")
@click.option("--score-output", "score_output", help="The model output scored (default: the first), e.g. a "
              "pooled sentence embedding.")
@click.option("--f", "f", type=click.IntRange(min=1), default=1, show_default=True, help="Failures k-of-n tolerates.")
@click.option("--fill", type=click.Choice(["zeros", "mean"]), default="zeros", show_default=True,
              help="What stands in for units no copy holds: zeros, or their means on the calibration slice.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the rows as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG: metric vs memory.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the first policy / r (or the --pick "
              "point) as a plan dir.")
@click.option("--search", "search_", is_flag=True, help="NSGA-II over per-region (per-block with heads) fractions "
              "of k-of-n (else vital), from 0 and the --r values: memory against the mean under single failures.")
@click.option("--generations", type=click.IntRange(min=1), help="--search generations [default: 10].")
@click.option("--population", type=click.IntRange(min=2), help="--search population [default: 20].")
@click.option("--seed", type=int, help="--search seed [default: 0].")
@click.option("--pick", type=click.Choice(["memory", "metric", "knee"]), help="Write this front point as -o.")
def robustness(model: Path, devices: int | None, cluster: Path | None, data_path: Path, calibration: Path | None,
               policies: str, rs: str, importance_: str, failures: str, strategy: str, metric: str | None,
               score_output: str | None, f: int, fill: str, json_path: Path | None, plot_path: Path | None,
               output: Path | None, search_: bool, generations: int | None, population: int | None,
               seed: int | None, pick: str | None) -> None:
    """Accuracy (or fidelity) of replication policies under every failure set, against their memory."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgesplit.layout import Fill
    from edgesplit.layout import Strategy as _Strategy
    from edgesplit.robust import data, report, study
    from edgesplit.robust.importance import Importance
    from edgesplit.robust.policies import Policy

    request = study.Request(
        model, _cluster(devices, cluster), data_path, calibration,
        tuple(_parsed(Policy, p, "--policy") for p in data.parse_list(policies, str, "--policy")),
        tuple(data.parse_list(rs, float, "--r")),
        tuple(_parsed(Importance, m, "--importance") for m in data.parse_list(importance_, str, "--importance")),
        tuple(data.parse_list(failures, int, "--failures")), _Strategy(strategy), metric, f, Fill(fill),
        score_output, _search(search_, generations, population, seed, pick, output))
    t0 = time.perf_counter()
    prepared = study.prepare_request(request)
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("evaluating", total=prepared.steps)
        rows, first = study.evaluate_all(prepared, f, lambda: progress.advance(task))
        searching = progress.add_task("searching", total=None) if search_ else None
        front = study.search_front(prepared, request, rows, f, lambda: progress.advance(searching)) \
            if search_ else None
    console.print(report.table(rows, prepared.study))
    if front is not None:
        console.print(report.front_table(front))
    if any(r.policy is Policy.PARITY for r in rows):
        console.print(report.coded_line(prepared.study.coded_memory()))
    console.print(f"evaluated {len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    for path in study.write(rows, prepared, request, first, json_path, plot_path, output, front, f):
        console.print(f"wrote {path}")


def _search(search: bool, generations: int | None, population: int | None, seed: int | None, pick: str | None,
            plan_dir: Path | None):
    from edgesplit.robust import study

    asked = [name for name, v in (("--generations", generations), ("--population", population), ("--seed", seed),
                                  ("--pick", pick)) if v is not None]
    config = study.Search(generations or 10, population or 20, seed or 0,
                          study.Pick(pick) if pick else None) if search else None
    study.check_search(config, asked, plan_dir)
    return config


def _parsed(kind, value: str, what: str):
    try:
        return kind.parse(value, what)
    except ValueError as exc:
        raise EdgesplitError(str(exc)) from None


@main.group(cls=_Group)
def device() -> None:
    """Bring edge devices into a Ray cluster under their edgesplit names, and list them."""


def _node_options(f):
    for opt in reversed([
        click.option("--cores", type=int, help="CPU cores the device gives Ray (default: all)."),
        click.option("--memory", help="Memory the device gives the model, e.g. 2GiB (default: Ray's estimate)."),
        click.option("--object-store-memory", help="Ray object store size, e.g. 200MB."),
        click.option("--node-ip-address", help="This device's address on the cluster network."),
        click.option("--temp-dir", type=click.Path(path_type=Path), help="Ray's temporary directory on this device."),
        click.option("--token-file", type=click.Path(path_type=Path), help="The cluster's Ray auth token file."),
        click.option("--no-auth", is_flag=True, help="No token authentication (only on a network you trust)."),
        click.option("--block", is_flag=True, help="Stay in the foreground (for systemd and the like)."),
    ]):
        f = opt(f)
    return f


def _options(name, cores, memory, object_store_memory, node_ip_address, temp_dir, token_file, no_auth, block):
    from edgesplit.cluster import parse_bytes
    from edgesplit.runtime.raynodes import NodeOptions

    return NodeOptions(name=name, cores=cores, memory=parse_bytes(memory, "--memory") if memory else None,
                       object_store_memory=parse_bytes(object_store_memory, "--object-store-memory")
                       if object_store_memory else None, node_ip_address=node_ip_address, temp_dir=temp_dir,
                       auth=not no_auth, token_file=token_file, block=block)


@device.command("head")
@click.option("--name", help="Also host the edgesplit device NAME on the head (default: none).")
@click.option("--port", type=int, default=6379, show_default=True, help="GCS port of the head.")
@click.option("--dashboard", is_flag=True, help="Start the Ray dashboard too.")
@_node_options
def device_head(name, port, dashboard, **kw) -> None:
    """Start the head of an edgesplit Ray cluster (token authentication on)."""
    from edgesplit.runtime import raynodes

    address, token = raynodes.start_head(_options(name, **kw), port=port, dashboard=dashboard)
    console.print(Text.assemble("head started at ", (address, "bold")))
    if token:
        console.print(f"auth token: {token} ({raynodes.describe_mode(Path(token))}; copy it to each device's "
                      "~/.ray/auth_token, mode 600)", markup=False, highlight=False, soft_wrap=True)
    console.print(f"on each device: edgesplit device join {address} --name NAME --cores N --memory SIZE",
                  markup=False, highlight=False, soft_wrap=True)


@device.command("join")
@click.argument("head_address")
@click.option("--name", required=True, help="The edgesplit device name (as in cluster.yaml and the plan).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the head.")
@_node_options
def device_join(head_address, name, timeout, **kw) -> None:
    """Start a Ray node on this machine that joins HEAD_ADDRESS as device NAME."""
    from edgesplit.runtime import raynodes

    node = raynodes.join(head_address, _options(name, **kw), timeout=timeout)
    if node is not None:
        console.print(f"device {node.name} joined {head_address} as node {node.address} "
                      f"({node.cores:g} cores, {node.memory / 2**30:.2f} GiB)", markup=False, highlight=False,
                      soft_wrap=True)


@device.command("list")
@click.option("--address", envvar="RAY_ADDRESS", required=True, help="Head address HOST:PORT (or $RAY_ADDRESS).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the head.")
@click.option("--all", "show_all", is_flag=True, help="Every node, including dead ones and plain Ray nodes.")
@click.option("--token-file", type=click.Path(path_type=Path), help="The cluster's Ray auth token file.")
@click.option("--no-auth", is_flag=True, help="The cluster runs without token authentication.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def device_list(address, timeout, show_all, token_file, no_auth, as_json) -> None:
    """Show the cluster's devices: cores, memory, and which are alive."""
    from rich.table import Table

    from edgesplit.runtime import raynodes

    found = raynodes.nodes(address, timeout=timeout, auth=not no_auth, token_file=token_file)
    rows = found if show_all else raynodes.devices(found)
    twice = raynodes.duplicates(found)
    if as_json:
        click.echo(json.dumps({"address": address, "devices": [r.to_dict() for r in rows], "duplicates": twice},
                              indent=1))
        return
    table = Table(title=f"devices of {address}")
    for col in ("device", "alive", "cores", "memory", "object store", "providers", "node", "address"):
        table.add_column(col)
    for r in rows:
        table.add_row((r.name or "-") + (" (head)" if r.head else ""), "[green]yes[/]" if r.alive else "[red]no[/]",
                      f"{r.cores:g}", f"{r.memory / 2**30:.2f} GiB", f"{r.object_store / 2**20:.0f} MiB",
                      ", ".join(p.removesuffix("ExecutionProvider") for p in r.providers) or "-",
                      r.node_id[:12], r.address)
    console.print(table)
    if twice:
        say(err_console, "warning:", "bold red", f"device name(s) {twice} are registered by more than one alive node")


from edgesplit.search.commands import profile_command, search_command  # noqa: E402 - they use this module's helpers

main.add_command(profile_command)
main.add_command(search_command)

if __name__ == "__main__":
    main()
