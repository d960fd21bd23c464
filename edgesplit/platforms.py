"""AutoDiCE's descriptions of devices, as clusters: its `platform.txt` and the `host_resource` keys of its mappings.

`platform.txt` has one host a line, in any of AutoDiCE's forms:

    nx01, arm, slots=0-5, gpu=NVIDIAVolta (CUDA)     # host, CPU kind, cores, GPU
    tx01:192.168.178.66                              # host and address (the address is not used here)
    nx02                                             # just the host

A mapping key such as `lenovo_cpu012345`, `nx01_arm0123` or `lenovo_gpu` is a host, then the cores it uses (one
digit each) or a GPU. What neither says (memory, links, speed) comes from the defaults below, which `describe`
prints; on a platform line `memory=`, `speed=` and `providers=` (separated by `|`) override them, and a line
`links, bandwidth=1gbit, latency=0.5ms` sets the link between hosts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from edgesplit.cluster import Cluster, Device, Link, parse_bandwidth, parse_bytes, parse_seconds
from edgesplit.errors import ClusterError

HOST_MEMORY = 4 * 2**30  # bytes per host when the file does not say
HOST_CORES = 4  # cores of a host whose line gives no slots
LOCAL_LINK = Link(bandwidth=10e9, latency=1e-5)  # two devices of one host: shared memory, not the network
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
TENSORRT = ("TensorrtExecutionProvider", *CUDA)
_KEY = re.compile(r"(?P<host>[A-Za-z0-9.\-]+)_(?P<kind>cpu|arm|gpu)(?P<cores>\d*)")


def gpu_providers(gpu: str) -> tuple[str, ...]:
    """The onnxruntime providers for a GPU as AutoDiCE names it: CUDA for NVIDIA ones, TensorRT where it says so."""
    text = gpu.lower()
    if "tensorrt" in text:
        return TENSORRT
    return CUDA if ("cuda" in text or "nvidia" in text or text == "gpu") else ()


def from_keys(keys: Iterable[str]) -> Cluster:
    """One device per mapping key: cores from the key's digits, a GPU key noted as one; keys of one host share its
    memory and a local link. A key that is not `host_resource` is a device of its own with the defaults."""
    devices = []
    for key in dict.fromkeys(keys):
        m = _KEY.fullmatch(key)
        if m is None:
            devices.append(Device(key, HOST_CORES, HOST_MEMORY))
        elif m["kind"] == "gpu":
            devices.append(Device(key, 1, HOST_MEMORY, providers=gpu_providers("gpu"), host=m["host"], gpu="gpu"))
        else:
            devices.append(Device(key, max(1, len(m["cores"])), HOST_MEMORY, host=m["host"]))
    return _with_local_links(devices, Cluster.default_link)


def _with_local_links(devices: list[Device], default: Link) -> Cluster:
    pairs = {(a.name, b.name): LOCAL_LINK for i, a in enumerate(devices) for b in devices[i + 1:]
             if a.host and a.host == b.host}
    return Cluster(tuple(devices), default, pairs)


def load_platform(path: str | Path) -> Cluster:
    """A cluster from an AutoDiCE platform file: one device per host line."""
    path = Path(path)
    devices: list[Device] = []
    default = Cluster.default_link
    problems: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            if line.split(",")[0].strip() == "links":
                default = _link_line(line)
            else:
                devices.append(_device_line(line))
        except ClusterError as exc:
            problems.append(f"line {number} ({line!r}): {exc}")
    if not devices and not problems:
        problems.append("expected one host a line (e.g. 'nx01, arm, slots=0-5, gpu=NVIDIAVolta (CUDA)'), got none")
    if problems:
        raise ClusterError(f"{path}: invalid AutoDiCE platform file:\n  " + "\n  ".join(problems))
    try:
        return Cluster(tuple(devices), default)
    except ClusterError as exc:
        raise ClusterError(f"{path}: {exc}") from None


def _device_line(line: str) -> Device:
    fields = [f.strip() for f in line.split(",")]
    name = fields[0].split(":", 1)[0].strip()  # `host:address`
    keys = dict(_key_value(f) for f in fields[1:] if "=" in f)
    gpu = keys.pop("gpu", "")
    cores = _slots(keys.pop("slots")) if "slots" in keys else HOST_CORES
    memory = parse_bytes(keys.pop("memory"), "memory") if "memory" in keys else HOST_MEMORY
    speed = _number(keys.pop("speed", "1"), "speed")
    given = keys.pop("providers", "")
    providers = tuple(p.strip() for p in given.split("|") if p.strip()) if given else gpu_providers(gpu)
    if keys:
        raise ClusterError(f"unknown key(s) {sorted(keys)}; expected slots, gpu, memory, speed, providers")
    return Device(name, cores, memory, speed=speed, providers=providers, gpu=gpu)


def _link_line(line: str) -> Link:
    keys = dict(_key_value(f.strip()) for f in line.split(",")[1:] if "=" in f)
    if "bandwidth" not in keys:
        raise ClusterError("expected 'links, bandwidth=RATE, latency=TIME', e.g. 'links, bandwidth=1gbit, latency=1ms'")
    return Link(parse_bandwidth(keys["bandwidth"]), parse_seconds(keys.get("latency", "0")))


def _key_value(field: str) -> tuple[str, str]:
    key, _, value = field.partition("=")
    return key.strip(), value.strip()


def _slots(text: str) -> int:
    """`0-5` -> 6 cores, `0,2,4` -> 3, `0-3,6` -> 5 (AutoDiCE's MPI slots)."""
    cores: set[int] = set()
    for part in re.split(r"[,;]", text):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if m is None:
            raise ClusterError(f"slots: expected core numbers such as 0-5 or 0,1,2, got {text!r}")
        first, last = int(m[1]), int(m[2] or m[1])
        cores.update(range(first, last + 1))
    return max(1, len(cores))


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ClusterError(f"{what}: expected a number, got {text!r}") from None


def describe(cluster: Cluster, source: str) -> str:
    """One line per device and the defaults the cluster took, for the CLI to print."""
    rows = [f"{d.name}: {d.cores} core(s), {d.memory / 2**30:g} GiB" + (f" shared by host {d.host}" if d.host else "")
            + (f", GPU {d.gpu} -> {', '.join(d.providers)}" if d.gpu else "") for d in cluster.devices]
    link = cluster.default_link
    local = " (within one host 80 Gbit/s, 0.01 ms)" if cluster.links else ""
    return (f"devices from {source} (memory {HOST_MEMORY / 2**30:g} GiB per host and links "
            f"{link.bandwidth * 8 / 1e6:g} Mbit/s, {link.latency * 1e3:g} ms between hosts{local} are defaults; "
            f"give --cluster cluster.yaml to set them):\n  " + "\n  ".join(rows))
