"""profile: how long each layer takes on a device kind, measured here with onnxruntime's profiler.

A device kind is its thread count (its cores, at most this machine's). Per-node times come from the profiler with
graph optimisations off (so every node of the source keeps its name); they are then scaled so that their sum
matches the optimised whole model measured in the same run, since stages run optimised. Kinds not on this machine
are scaled by their `speed` in the cost model (`speed` 1.0 is this machine). Per-call overhead and the memory of an
empty session are measured once per kind. Profiles are cached beside the model, keyed by its hash and the kind.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from edgesplit.bench.harness import machine as host_machine
from edgesplit.bench.harness import median_seconds
from edgesplit.cluster import Device
from edgesplit.errors import InputError
from edgesplit.graph import Graph
from edgesplit.runtime.common import random_inputs, session_options

VERSION = 3


@dataclass(frozen=True)
class Profile:
    """Measured costs of one model on one device kind of this machine."""

    model_sha256: str
    threads: int
    dims: dict[str, int]  # the symbolic dimensions' sizes it was measured at
    layer_seconds: tuple[float, ...]  # per layer, in the graph's topological order
    whole_seconds: float  # the optimised whole model, one request
    call_seconds: float  # onnxruntime's fixed cost of one session.run
    session_bytes: int  # resident memory of a process's onnxruntime runtime with one tiny session open
    weight_factor: float  # the whole model's loaded session memory ÷ its parameter bytes
    activation_factor: float  # what one run adds ÷ the peak bytes of live activations
    machine: str
    version: int = VERSION
    device: str = ""  # the device it was measured on (`edgesplit profile --address`); "" = a kind, measured here

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> Profile:
        return Profile(**{**d, "layer_seconds": tuple(d["layer_seconds"]), "dims": dict(d["dims"])})


def kind(threads: int) -> str:
    return f"cpu-{threads}t"


def for_device(profiles: Mapping[int | str, Profile], device: Device) -> Profile:
    """The profile of `device`: one measured on it (keyed by its name), else one of its kind measured at exactly its
    cores (on a board like it, say), else the one measured here at as many threads as this machine allows."""
    return profiles.get(device.name) or profiles.get(device.cores) or profiles[threads_of(device.cores)]


def speed_factor(found: Profile, device: Device, host_speed: float) -> float:
    """What the profiled seconds are multiplied by on `device`: 1 when measured on it, else this machine's speed over
    the device's (both in the cluster's units)."""
    return 1.0 if found.device and found.device == device.name else host_speed / device.speed


def threads_of(cores: int) -> int:
    return max(1, min(cores, os.cpu_count() or 1))


def cache_path(graph: Graph, threads: int, dims: Mapping[str, int] | None = None) -> Path | None:
    """Where the profile of a kind is cached, beside the model (None: the model is not a file)."""
    return _beside(graph, kind(threads), dims)


def device_profile_path(graph: Graph, device: str, dims: Mapping[str, int] | None = None) -> Path | None:
    """Where the profile measured on `device` is written, beside the model (None: the model is not a file)."""
    return _beside(graph, "on-" + re.sub(r"[^A-Za-z0-9._-]", "_", device), dims)


def _beside(graph: Graph, tag: str, dims: Mapping[str, int] | None) -> Path | None:
    if not graph.path:
        return None
    model = Path(graph.path)
    sizes = "".join(f"-{k}{v}" for k, v in sorted((dims or {}).items()))
    return model.with_name(f"{model.name}.profile-{graph.sha256[:12]}-{tag}{sizes}.json")


def profile(graph: Graph, threads: int, repeats: int = 10, use_cache: bool = True,
            on_step: Callable[[], None] = lambda: None, dims: Mapping[str, int] | None = None) -> Profile:
    """The profile of `graph` at `threads`: from the cache beside the model when it matches, else measured."""
    dims = dict(dims or {})
    cached = cache_path(graph, threads, dims)
    if use_cache and cached is not None and cached.is_file():
        try:
            found = load_profile(cached)
        except InputError:  # an older edgesplit's or a damaged cache: measure again, write it anew
            found = None
        if found is not None and (found.model_sha256, found.threads, found.dims, len(found.layer_seconds)) == (
                graph.sha256, threads, dims, len(graph.layers)):
            return found
    measured = measure(graph, threads, repeats, on_step, dims)
    if cached is not None:
        try:
            cached.write_text(json.dumps(measured.to_dict()))
        except OSError:
            pass  # a read-only model folder: profile again next time
    return measured


def load_profile(path: Path) -> Profile:
    try:
        found = Profile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: expected an edgesplit profile (JSON), could not read it: {exc}") from None
    if found.version != VERSION:
        raise InputError(f"{path}: expected profile version {VERSION}, got {found.version}")
    return found


def check_profile(found: Profile, graph: Graph, threads: int, source: str) -> None:
    if found.model_sha256 != graph.sha256:
        raise InputError(f"{source}: the profile is of model {found.model_sha256[:12]}, expected {graph.sha256[:12]} "
                         f"({graph.path or graph.name})")
    if found.threads != threads:
        raise InputError(f"{source}: the profile is of device kind {kind(found.threads)}, expected {kind(threads)}")


def measure(graph: Graph, threads: int, repeats: int = 10, on_step: Callable[[], None] = lambda: None,
            dims: Mapping[str, int] | None = None) -> Profile:
    feeds = random_inputs([graph.tensors[n] for n in graph.inputs], dims)
    model = graph.model.SerializeToString()
    first = _whole_seconds(model, feeds, threads, repeats)
    on_step()
    per_node = _node_seconds(model, feeds, threads, repeats)
    # the faster of two medians, before and after the profiled runs: a cold start or other load only slows
    whole = min(first, _whole_seconds(model, feeds, threads, repeats))
    on_step()
    raw = np.array([per_node.get(layer.name, 0.0) for layer in graph.layers])
    call = _call_seconds(threads, repeats * 20)
    # the profiler's own cost and the unfused graph inflate the sum; stages run optimised
    scale = max(whole - call, 1e-9) / raw.sum() if raw.sum() > 0 else 0.0
    machine = f"{host_machine()['cpu']} ({os.cpu_count()} cores)"
    runtime, loaded, ran = _memory(model, feeds)
    weights = max(graph.total_param_bytes, 1)
    peak = max(float(live_bytes(graph).max(initial=0.0)), 1.0)
    return Profile(graph.sha256, threads, dict(dims or {}), tuple(float(x) for x in raw * scale), whole, call,
                   runtime, max(loaded / weights, 1.0), max(ran - loaded, 0) / peak, machine)


def live_bytes(graph: Graph) -> np.ndarray:
    """live[p]: bytes of the activations alive while layer p runs (made at or before p, still needed at p)."""
    n = len(graph.layers)
    made = {t: 0 for t in graph.inputs}
    last: dict[str, int] = {}
    for p, layer in enumerate(graph.layers):
        made.update(dict.fromkeys(layer.outputs, p))
        last.update(dict.fromkeys((t for t in layer.inputs if t in made), p))
    last.update(dict.fromkeys(graph.outputs, n - 1))
    delta = np.zeros(n + 1)
    for t, start in made.items():
        if t in last and t in graph.tensors:
            delta[start] += graph.tensors[t].nbytes
            delta[last[t] + 1] -= graph.tensors[t].nbytes
    return np.cumsum(delta)[:n]


def _whole_seconds(model: bytes, feeds: Mapping[str, np.ndarray], threads: int, repeats: int) -> float:
    sess = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    return median_seconds(lambda: sess.run(None, dict(feeds)), repeats)


def _node_seconds(model: bytes, feeds: Mapping[str, np.ndarray], threads: int, repeats: int) -> dict[str, float]:
    """Median seconds of every node over `repeats` profiled runs (graph optimisations off, names kept)."""
    opts = session_options(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "edgesplit")
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        for _ in range(repeats + 2):
            sess.run(None, dict(feeds))
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            runs.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] * 1e-6)
    return {name: statistics.median(d[2:] if len(d) > 2 else d) for name, d in runs.items()}


def _tiny() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _call_seconds(threads: int, repeats: int) -> float:
    sess = ort.InferenceSession(_tiny(), session_options(threads), providers=["CPUExecutionProvider"])
    x = {"x": np.zeros(1, np.float32)}
    return median_seconds(lambda: sess.run(None, x), repeats, warmup=10)


def _memory(model: bytes, feeds: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """In a fresh process, as a device measures it: (onnxruntime's own resident memory with a tiny session, the
    model's lean session once loaded, and after one run) in bytes; the last two are unique memory."""
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys, psutil; p = psutil.Process(); before = p.memory_info().rss; "
            "from edgesplit.runtime.lean import lean_session, start_onnxruntime, trim; start_onnxruntime(1); "
            "runtime = p.memory_info().rss - before; base = p.memory_full_info().uss; "
            "model, feeds = pickle.load(sys.stdin.buffer); s = lean_session(model, 1); del model; trim(); "
            "loaded = p.memory_full_info().uss - base; s.run(None, feeds); trim(); "
            "print(runtime, loaded, p.memory_full_info().uss - base)")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((model, dict(feeds))), capture_output=True,
                          timeout=600)
    if done.returncode != 0:
        raise InputError(f"measuring the model's memory failed: {done.stderr.decode()[-500:]}")
    runtime, loaded, ran = (int(x) for x in done.stdout.split()[-3:])
    return runtime, loaded, ran
