"""Devices and the links between them, read from and written to YAML."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgesplit.errors import ClusterError

_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class PowerProfile:
    """Estimated board power in watts when idle and when all cores are busy (no meter is read)."""

    idle_w: float
    busy_w: float


@dataclass(frozen=True)
class Device:
    name: str
    cores: int
    memory: int  # bytes available to the model
    speed: float = 1.0  # relative compute speed, used to weight load
    power: PowerProfile | None = None
    providers: tuple[str, ...] = ()  # onnxruntime execution providers in order of preference; () = CPU
    host: str = ""  # devices naming the same host share its memory (`memory` is the host's) and a local link
    gpu: str = ""  # the GPU this device stands for, as its source described it ("" = none)


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes per second
    latency: float  # seconds


@dataclass(frozen=True)
class Cluster:
    devices: tuple[Device, ...]
    default_link: Link = Link(bandwidth=100e6 / 8, latency=2e-3)
    links: Mapping[tuple[str, str], Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _problems(self.devices, self.default_link, self.links)
        if problems:
            raise ClusterError("invalid cluster:\n  " + "\n  ".join(problems))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise ClusterError(f"expected one of the cluster's devices {list(self.names)}, got {name!r}")

    def link(self, a: str, b: str) -> Link:
        return self.links.get((a, b)) or self.links.get((b, a)) or self.default_link

    @staticmethod
    def simulated(n: int, cores: int = 1, memory: int = 4 * 2**30, prefix: str = "dev") -> Cluster:
        if n < 1:
            raise ClusterError(f"expected at least 1 device, got {n}")
        return Cluster(tuple(Device(f"{prefix}{i}", cores, memory) for i in range(n)))

    @staticmethod
    def load(path: str | Path) -> Cluster:
        path = Path(path)
        if path.suffix == ".txt" and path.is_file():
            from edgesplit.platforms import load_platform

            return load_platform(path)
        if not path.is_file():
            raise ClusterError(f"expected a cluster YAML file, but {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ClusterError(f"{path} is not valid YAML: {exc}") from None
        return Cluster.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def to_dict(self) -> dict[str, Any]:
        def link(l: Link) -> dict[str, Any]:
            return {"bandwidth": f"{l.bandwidth * 8 / 1e6:g}mbit", "latency": f"{l.latency * 1e3:g}ms"}

        devices = []
        for d in self.devices:
            entry: dict[str, Any] = {"name": d.name, "cores": d.cores, "memory": format_bytes(d.memory), "speed": d.speed}
            if d.power:
                entry["power"] = {"idle_w": d.power.idle_w, "busy_w": d.power.busy_w}
            entry.update(_extras(d))
            devices.append(entry)
        links: dict[str, Any] = {"default": link(self.default_link)}
        if self.links:
            links["pairs"] = [{"between": list(k), **link(v)} for k, v in self.links.items()]
        return {"devices": devices, "links": links}

    @staticmethod
    def from_dict(data: Any, source: str = "cluster") -> Cluster:
        """Every problem of the description at once: unreadable fields and impossible values together."""
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list) or not data["devices"]:
            raise ClusterError(f"{source}: expected a mapping with a non-empty 'devices' list, got {_kind(data)}")
        devices, problems = _devices(data["devices"])
        default, pairs, link_problems = _links(data.get("links"))
        named = [str(e["name"]) for e in data["devices"] if isinstance(e, dict) and "name" in e]
        problems += link_problems + _problems(tuple(devices), default, pairs, named)
        if problems:
            raise ClusterError(f"{source}: invalid cluster:\n  " + "\n  ".join(dict.fromkeys(problems)))
        return Cluster(tuple(devices), default, pairs)


def _devices(entries: list[Any]) -> tuple[list[Device], list[str]]:
    devices, problems = [], []
    for i, entry in enumerate(entries):
        where = f"devices[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with name, cores, memory, got {_kind(entry)}")
            continue
        missing = [k for k in ("name", "cores", "memory") if k not in entry]
        if missing:
            problems.append(f"{where} ({entry.get('name', '?')}): missing field(s) {missing}")
            continue
        try:
            power = entry.get("power")
            devices.append(Device(
                name=str(entry["name"]), cores=_int(entry["cores"], f"{where}.cores"),
                memory=parse_bytes(entry["memory"], f"{where}.memory"),
                speed=_number(entry.get("speed", 1.0), f"{where}.speed"),
                power=PowerProfile(_number(power["idle_w"], f"{where}.power.idle_w"),
                                   _number(power["busy_w"], f"{where}.power.busy_w")) if power else None,
                **_extras_from(entry, where),
            ))
        except ClusterError as exc:
            problems.append(str(exc))
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{where}: {exc}")
    return devices, problems


def _links(data: Any) -> tuple[Link, dict[tuple[str, str], Link], list[str]]:
    """The default link and the pairs; a pair given twice (either way round) with other values is a problem."""
    default, pairs, problems = Cluster.default_link, {}, []
    if data is None:
        return default, pairs, problems
    if not isinstance(data, dict) or not isinstance(data.get("pairs") or [], list):
        problems.append(f"links: expected a mapping with 'default: {{bandwidth, latency}}' and/or 'pairs: [...]', "
                        f"got {_kind(data)}")
        return default, pairs, problems
    if "default" in data:
        try:
            default = _link(data["default"], "links.default")
        except ClusterError as exc:
            problems.append(str(exc))
    for j, pair in enumerate(data.get("pairs") or []):
        between = pair.get("between") if isinstance(pair, dict) else None
        try:
            if not isinstance(between, list) or len(between) != 2:
                raise ClusterError(f"links.pairs[{j}]: expected 'between: [deviceA, deviceB]', got {between!r}")
            a, b = str(between[0]), str(between[1])
            link = _link(pair, f"links.pairs[{j}]")
        except ClusterError as exc:
            problems.append(str(exc))
            continue
        known = pairs.get((a, b)) or pairs.get((b, a))
        if known is None:
            pairs[(a, b)] = link
        elif known != link:
            problems.append(f"links.pairs[{j}]: the link {a}-{b} is given twice, with different values "
                            f"({describe_link(known)} and {describe_link(link)}); expected one value per pair")
    return default, pairs, problems


def _problems(devices: tuple[Device, ...], default_link: Link, links: Mapping[tuple[str, str], Link],
              named: list[str] | None = None) -> list[str]:
    """Impossible values; `named`: every device name the description gives (parsed or not), for the links."""
    problems = []
    names = [d.name for d in devices]
    if not names and not named:
        problems.append("expected at least one device, got none")
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"device name {dup!r} appears {names.count(dup)} times; names must be unique")
    for d in devices:
        problems += _device_problems(d)
    for (a, b), link in [(("default", "default"), default_link), *links.items()]:
        for end in dict.fromkeys((a, b)):
            if end != "default" and end not in (named if named is not None else names):
                problems.append(f"link {a}-{b}: unknown device {end!r}; expected one of {names}")
        if a == b != "default":
            problems.append(f"link {a}-{b}: a device cannot have a link to itself; expected two different devices")
        if (b, a) in links and a < b and links[(b, a)] != link:
            problems.append(f"link {a}-{b} is given both ways round with different values "
                            f"({describe_link(link)} and {describe_link(links[(b, a)])}); expected one value per pair")
        if not link.bandwidth > 0 or not link.latency >= 0 or not math.isfinite(link.bandwidth + link.latency):
            problems.append(f"link {a}-{b}: expected bandwidth > 0 and latency >= 0, got {link.bandwidth} B/s, {link.latency} s")
    return problems


def _extras(d: Device) -> dict[str, Any]:
    """The optional fields of a device that differ from their defaults, as YAML writes them."""
    extra: dict[str, Any] = {"providers": list(d.providers)} if d.providers else {}
    return {**extra, **({"host": d.host} if d.host else {}), **({"gpu": d.gpu} if d.gpu else {})}


def _extras_from(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    providers = entry.get("providers", [])
    if not isinstance(providers, list) or not all(isinstance(p, str) and p for p in providers):
        raise ClusterError(f"{where}.providers: expected a list of onnxruntime execution providers such as "
                           f"[CUDAExecutionProvider, CPUExecutionProvider], got {providers!r}")
    return {"providers": tuple(providers), "host": str(entry.get("host", "")), "gpu": str(entry.get("gpu", ""))}
def _device_problems(d: Device) -> list[str]:
    problems = []
    if not d.name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", d.name):
        problems.append(f"device name {d.name!r}: expected letters, digits, '_', '.', '-'")
    if d.cores < 1:
        problems.append(f"device {d.name!r}: expected cores >= 1, got {d.cores}")
    if d.memory <= 0:
        problems.append(f"device {d.name!r}: expected memory > 0, got {d.memory}")
    if not 0 < d.speed < math.inf:
        problems.append(f"device {d.name!r}: expected speed > 0, got {d.speed}")
    if d.power and not (0 <= d.power.idle_w <= d.power.busy_w < math.inf):
        problems.append(f"device {d.name!r}: expected 0 <= idle_w <= busy_w, got {d.power.idle_w}, {d.power.busy_w}")
    return problems


def describe_link(link: Link) -> str:
    """A link as a person writes it: "100 Mbit/s, 2 ms"."""
    return f"{link.bandwidth * 8 / 1e6:.4g} Mbit/s, {link.latency * 1e3:.4g} ms"


def _kind(x: Any) -> str:
    return f"{type(x).__name__} {x!r}"[:120]


def _number(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ClusterError(f"{where}: expected a number, got {value!r}") from None


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClusterError(f"{where}: expected an integer, got {value!r}")
    return value


def parse_bytes(value: Any, where: str = "value") -> int:
    """'4GiB', '512MB', 1024 -> bytes (exact for whole numbers of a unit)."""
    expected = f"{where}: expected a size like 4GiB, 512MB or a byte count, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ClusterError(expected)
        return int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _BYTES:
        raise ClusterError(expected)
    number, unit = m.group(1), _BYTES[m.group(2).lower()]
    return int(number) * int(unit) if number.isdigit() else int(float(number) * unit)


def format_bytes(n: int) -> str:
    """The shortest exact size text parse_bytes reads back to `n`: '3GiB', '3GB', '1536MiB' or a byte count."""
    for unit in ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "kB"):
        size = int(_BYTES[unit.lower()])
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_bandwidth(value: Any, where: str = "bandwidth") -> float:
    """'100mbit', '1gbit' -> bytes per second; a bare number is bytes per second."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z/]*)\s*", str(value))
    unit = m.group(2).lower().replace("/s", "") if m else ""
    if not m or unit not in _BITS:
        raise ClusterError(f"{where}: expected a rate like 100mbit or 1gbit, got {value!r}")
    return float(m.group(1)) * _BITS[unit] / 8


def parse_seconds(value: Any, where: str = "latency") -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", str(value))
    if not m or m.group(2) not in _SECONDS:
        raise ClusterError(f"{where}: expected a duration like 2ms or 0.5s, got {value!r}")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _link(d: Any, where: str) -> Link:
    if not isinstance(d, dict) or "bandwidth" not in d:
        raise ClusterError(f"{where}: expected a mapping with bandwidth and latency, got {_kind(d)}")
    return Link(parse_bandwidth(d["bandwidth"], f"{where}.bandwidth"), parse_seconds(d.get("latency", 0), f"{where}.latency"))
