"""The split as data: regions, their parts and replicas, and the layout (regions + where every node runs).

A *region* is one or more layers computed as parts: each part computes a set of the region's *units* (output
channels, input channels, rows, columns, tiles, attention-head groups, MLP neurons, vocabulary columns) and a
combine node merges the parts (Concat along `axis`, or Sum of partial sums). A *replica* computes a subset of one
part's units on another device: *hot* replicas run on every request (a loss costs no extra time), *standby* ones
only once their part is lost. What no part or replica covers is stood in for by the region's fill, or, with no
fill, the request fails. Every type here is frozen and round-trips through `to_dict` / `from_dict` (plan.json).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, TypeVar


class Choice(str, Enum):
    """A mode chosen by name; `parse` gives a clear message for any other name."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:  # equal to its name as a string, so it hashes like one (sets, dict keys)
        return hash(self.value)

    @classmethod
    def parse(cls: type[E], value: Any, what: str = "") -> E:
        try:
            return cls(value)
        except ValueError:
            names = [c.value for c in cls]
            raise ValueError(f"{what or cls.__name__}: expected one of {names}, got {value!r}") from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(c.value for c in cls)


E = TypeVar("E", bound=Choice)


class Strategy(Choice):
    VERTICAL = "vertical"
    HORIZONTAL = "horizontal"
    HYBRID = "hybrid"
    HEADS = "heads"


class SplitFamily(Choice):
    """What the automatic horizontal choice may use (`--split`)."""

    CHANNELS = "channels"
    SPATIAL = "spatial"
    AUTO = "auto"


class SplitKind(Choice):
    LOP = "lop"  # output channels / neurons of a Conv, Gemm or MatMul
    LIP = "lip"  # input channels (partial sums)
    FUSED_CHANNELS = "fused-channels"  # an lop layer then an lip layer, one synchronisation
    HEIGHT = "height"
    WIDTH = "width"
    GRID = "grid"
    FUSED_SPATIAL = "fused-spatial"  # a run of layers tiled once, halos grown through it
    HEADS = "heads"  # attention by head groups (partial sums at the output projection)
    NEURONS = "neurons"  # MLP by hidden neurons (partial sums at the down projection)
    VOCAB = "vocab"  # LM head by vocabulary columns

    @property
    def spatial(self) -> bool:
        return self in (SplitKind.HEIGHT, SplitKind.WIDTH, SplitKind.GRID, SplitKind.FUSED_SPATIAL)

    @property
    def channel(self) -> bool:
        return self in (SplitKind.LOP, SplitKind.LIP, SplitKind.FUSED_CHANNELS)


CHANNEL_KINDS = tuple(k for k in SplitKind if k.channel)
SPATIAL_KINDS = tuple(k for k in SplitKind if k.spatial)
CNN_KINDS = CHANNEL_KINDS + SPATIAL_KINDS


class Combine(Choice):
    CONCAT = "concat"  # part outputs hold disjoint units along `axis`
    SUM = "sum"  # part outputs are partial sums over their units
    MAX = "max"  # part outputs are maxima over their units (a tiled global max pool)
    ARGMAX = "argmax"  # each part sends its best value and index (a distributed argmax LM head)


class Fill(Choice):
    ZEROS = "zeros"  # lost units are zeros (lost channels, or lost partial sums)
    MEAN = "mean"  # lost units are their calibrated means (`Region.fill_values`)


class ReplicaMode(Choice):
    HOT = "hot"  # computed on every request
    STANDBY = "standby"  # computed only for requests whose part is lost


class KvCache(Choice):
    GATHER = "gather"  # the model's own past/present interface; parts slice what they need
    SHARD = "shard"  # each part keeps the cache of its own heads


class LmHead(Choice):
    CONCAT = "concat"
    ARGMAX = "argmax"


class Sync(Choice):
    """How a split region's devices get its combined result (exchange by default: one hop fewer per
    synchronisation, the same bytes on the busiest link; more bytes in all with three or more devices)."""

    GATHER = "gather"  # the combine device merges the parts and sends the result on (two hops)
    EXCHANGE = "exchange"  # every device that reads the result gets the parts it lacks and combines itself


class Dataplane(Choice):
    AUTO = "auto"
    COMPILED = "compiled"
    TASKS = "tasks"
    PEER = "peer"


class Backend(Choice):
    LOCAL = "local"
    RAY = "ray"


def combine_of(kind: SplitKind) -> Combine:
    return Combine.SUM if kind in (SplitKind.LIP, SplitKind.FUSED_CHANNELS, SplitKind.HEADS, SplitKind.NEURONS) \
        else Combine.CONCAT


@dataclass(frozen=True)
class Replica:
    """A subset of one part's units computed on another device; `output` holds those units, in `units` order."""

    device: str
    units: tuple[int, ...]
    output: str
    nodes: tuple[str, ...] = ()
    mode: ReplicaMode = ReplicaMode.STANDBY

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "units": list(self.units), "output": self.output, "nodes": list(self.nodes),
                "mode": self.mode.value}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Replica:
        return Replica(str(d["device"]), tuple(int(u) for u in d["units"]), str(d["output"]),
                       tuple(d.get("nodes", ())), ReplicaMode.parse(d.get("mode", "standby"), "replica mode"))


@dataclass(frozen=True)
class Part:
    """The units one device computes; for a Concat its output holds them in `units` order along the region axis."""

    units: tuple[int, ...]
    output: str
    nodes: tuple[str, ...] = ()
    device: str | None = None  # None until placed
    share: float = 0.0  # of the region's work
    replicas: tuple[Replica, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"units": list(self.units), "output": self.output, "nodes": list(self.nodes), "device": self.device,
                "share": self.share, "replicas": [r.to_dict() for r in self.replicas]}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Part:
        return Part(tuple(int(u) for u in d["units"]), str(d["output"]), tuple(d.get("nodes", ())), d.get("device"),
                    float(d.get("share", 0.0)), tuple(Replica.from_dict(r) for r in d.get("replicas", ())))


@dataclass(frozen=True)
class Coded:
    """A coded part: the sum of the region's part outputs, each zero-padded to `width` units along the Concat axis,
    computed on a device holding none of its parts; any one lost part is the coded output minus the others'."""

    device: str
    output: str
    width: int
    nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "output": self.output, "width": self.width, "nodes": list(self.nodes)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Coded:
        return Coded(str(d["device"]), str(d["output"]), int(d["width"]), tuple(d.get("nodes", ())))


@dataclass(frozen=True)
class RegionStats:
    macs: int = 0  # of the layers the region replaced
    part_macs: int = 0  # of all its parts (more than `macs` by the halo recomputation)
    halo_bytes: int = 0
    inputs: tuple[str, ...] = ()  # tensors the parts read from outside the region

    @property
    def redundant_macs(self) -> int:
        return max(0, self.part_macs - self.macs)


@dataclass(frozen=True)
class Region:
    name: str
    kind: SplitKind
    layers: tuple[str, ...]  # the original layers it covers
    units: int  # how many units the split axis has
    combine: Combine
    combine_node: str  # the node that merges the parts (the synchronisation point)
    parts: tuple[Part, ...]
    axis: int = 1
    fill: Fill | None = Fill.ZEROS
    combine_nodes: tuple[str, ...] = ()  # every combine node (a grid has row concats before the final one)
    scatter: tuple[str, ...] = ()  # Slice nodes that cut a region input (run where the input is produced)
    block: int | None = None  # Transformer block index
    stats: RegionStats | None = None
    # fill MEAN, one entry per unit: Concat, the unit's mean activation (one value, or one per channel along
    # `fill_axis` when the units are rows or tiles); Sum, its mean contribution to the combined output along
    # `fill_axis` (one value per output channel / feature)
    fill_values: tuple[tuple[float, ...], ...] = ()
    fill_axis: int = 1
    coded: Coded | None = None  # the parity policy's coded part (Concat regions of linear parts)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n for p in self.parts for n in p.nodes)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(p.output for p in self.parts)

    @property
    def replicas(self) -> tuple[Replica, ...]:
        return tuple(r for p in self.parts for r in p.replicas)

    def with_parts(self, parts: Sequence[Part]) -> Region:
        return replace(self, parts=tuple(parts))

    def validate(self) -> list[str]:
        """Every problem of this region on its own (the plan checks its tensors and devices against the stages)."""
        where = f"region {self.name!r}"
        problems = []
        if self.units < 1:
            problems.append(f"{where}: expected at least 1 unit, got {self.units}")
        if len(self.parts) < 1:
            problems.append(f"{where}: expected at least one part, got none")
        seen: dict[int, int] = {}
        for i, p in enumerate(self.parts):
            if not p.units:
                problems.append(f"{where} part {i}: expected at least one unit, got none")
            bad = [u for u in p.units if not 0 <= u < self.units]
            if bad:
                problems.append(f"{where} part {i}: units {bad[:5]} outside 0..{self.units - 1}")
            if len(set(p.units)) != len(p.units):
                problems.append(f"{where} part {i}: a unit is listed twice")
            for u in p.units:
                if u in seen and seen[u] != i:
                    problems.append(f"{where}: unit {u} is in parts {seen[u]} and {i}; expected each unit in one part")
                    break
                seen.setdefault(u, i)
            for j, r in enumerate(p.replicas):
                extra = sorted(set(r.units) - set(p.units))
                if extra or not r.units:
                    problems.append(f"{where} part {i} replica {j}: expected a non-empty subset of the part's units, "
                                    f"got {'extra units ' + str(extra[:5]) if extra else 'none'}")
                if p.device is not None and r.device == p.device:
                    problems.append(f"{where} part {i} replica {j}: on the part's own device {p.device!r}; "
                                    f"expected another device")
        if len(seen) != self.units:
            problems.append(f"{where}: parts cover {len(seen)} of {self.units} units; expected all of them")
        problems += self._coded_problems(where)
        if self.fill is Fill.MEAN:
            sizes = {len(v) for v in self.fill_values}
            if len(self.fill_values) != self.units or len(sizes) != 1 or 0 in sizes:
                problems.append(f"{where}: fill 'mean' needs one non-empty value vector per unit, all of one length; "
                                f"got {len(self.fill_values)} for {self.units} units")
            elif self.combine not in (Combine.CONCAT, Combine.SUM):
                problems.append(f"{where}: fill 'mean' needs a Concat or Sum combine, got {self.combine.value!r}")
        return problems

    def _coded_problems(self, where: str) -> list[str]:
        c = self.coded
        if c is None:
            return []
        problems = []
        if self.combine is not Combine.CONCAT:
            problems.append(f"{where}: a coded part needs a Concat combine, got {self.combine.value!r}")
        widest = max((len(p.units) for p in self.parts), default=0)
        if c.width < widest:
            problems.append(f"{where}: coded part width {c.width} is less than its widest part ({widest} units)")
        if c.device in {p.device for p in self.parts}:
            problems.append(f"{where}: coded part on {c.device!r}, which holds one of its parts; expected a device "
                            f"holding none")
        return problems

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "kind": self.kind.value, "layers": list(self.layers), "units": self.units,
            "combine": self.combine.value, "combine_node": self.combine_node, "axis": self.axis,
            "fill": self.fill.value if self.fill else None, "parts": [p.to_dict() for p in self.parts],
            "combine_nodes": list(self.combine_nodes or (self.combine_node,)), "scatter": list(self.scatter),
            "block": self.block,
        }
        if self.fill_values:
            d["fill_values"] = [list(v) for v in self.fill_values]
            d["fill_axis"] = self.fill_axis
        if self.coded is not None:
            d["coded"] = self.coded.to_dict()
        if self.stats is not None:
            s = self.stats
            d["stats"] = {"macs": s.macs, "part_macs": s.part_macs, "halo_bytes": s.halo_bytes,
                          "inputs": list(s.inputs)}
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Region:
        s = d.get("stats")
        stats = RegionStats(int(s["macs"]), int(s["part_macs"]), int(s["halo_bytes"]), tuple(s.get("inputs", ()))) \
            if s is not None else None
        fill = d.get("fill", "zeros")
        return Region(
            name=str(d["name"]), kind=SplitKind.parse(d["kind"], f"region {d['name']!r} kind"),
            layers=tuple(d["layers"]), units=int(d["units"]),
            combine=Combine.parse(d["combine"], f"region {d['name']!r} combine"), combine_node=str(d["combine_node"]),
            parts=tuple(Part.from_dict(p) for p in d["parts"]), axis=int(d.get("axis", 1)),
            fill=Fill.parse(fill, f"region {d['name']!r} fill") if fill is not None else None,
            combine_nodes=tuple(d.get("combine_nodes", ())), scatter=tuple(d.get("scatter", ())),
            block=d.get("block"), stats=stats,
            fill_values=tuple(tuple(float(x) for x in v) for v in d.get("fill_values", ())),
            fill_axis=int(d.get("fill_axis", 1)),
            coded=Coded.from_dict(d["coded"]) if d.get("coded") is not None else None,
        )


@dataclass(frozen=True)
class Layout:
    """Regions plus the device of every node of the rewritten graph: everything a plan is cut from."""

    regions: tuple[Region, ...]
    placement: Mapping[str, str] = field(default_factory=dict)

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"expected a region of this layout ({[r.name for r in self.regions]}), got {name!r}")

    def validate(self, devices: Iterable[str] | None = None, nodes: Iterable[str] | None = None) -> list[str]:
        """Every problem at once: each region's own, names used twice, devices not in `devices`, part nodes not
        in `nodes` (the rewritten graph's), and part devices that disagree with the placement."""
        problems = [p for r in self.regions for p in r.validate()]
        names = [r.name for r in self.regions]
        problems += [f"region name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
        known = set(devices) if devices is not None else None
        have = set(nodes) if nodes is not None else None
        owner: dict[str, str] = {}
        for r in self.regions:
            for p in r.parts:
                for n in p.nodes:
                    if n in owner and owner[n] != r.name:
                        problems.append(f"node {n!r} is a part of regions {owner[n]!r} and {r.name!r}")
                    owner[n] = r.name
                    placed = self.placement.get(n)
                    if placed is not None and p.device is not None and placed != p.device:
                        problems.append(f"region {r.name!r}: node {n!r} of the part on {p.device!r} is placed on "
                                        f"{placed!r}")
                for x in (p, *p.replicas, *((r.coded,) if r.coded else ())):
                    if known is not None and x.device is not None and x.device not in known:
                        problems.append(f"region {r.name!r}: device {x.device!r} is not in the cluster "
                                        f"{sorted(known)}")
                    if have is not None:
                        missing = [n for n in x.nodes if n not in have]
                        if missing:
                            problems.append(f"region {r.name!r}: nodes {missing[:3]} are not in the graph")
        return list(dict.fromkeys(problems))


def regions_to_dicts(regions: Iterable[Region]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in regions]


def regions_from_dicts(raw: Iterable[Mapping[str, Any]], where: str = "regions") -> tuple[tuple[Region, ...], list[str]]:
    """Typed regions and every entry that could not be read (with what was wrong)."""
    regions, problems = [], []
    for i, d in enumerate(raw):
        try:
            regions.append(Region.from_dict(d))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            name = d.get("name") if isinstance(d, Mapping) else None
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            problems.append(f"{where}[{i}] ({name}): {detail}")
    return tuple(regions), problems
