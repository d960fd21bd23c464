"""cut: a placement becomes a Plan of stages (one ONNX file each) and transfers; save, load, verify."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, helper

from edgesplit import plandir, signing
from edgesplit.cluster import Cluster
from edgesplit.errors import PlanError
from edgesplit.graph import Graph, TensorInfo, node_references, sha256_file
from edgesplit.grouping import stage_groups
from edgesplit.layout import Layout, Region, regions_from_dicts
from edgesplit.standby import Standby
from edgesplit.standby import problems as standby_problems

FORMAT = "edgesplit-plan/2"
FORMAT_1 = "edgesplit-plan/1"  # untyped regions; loads when it has none
SOURCE = "@input"  # the requester, who feeds graph inputs
SINK = "@output"  # the requester, who collects graph outputs


@dataclass(frozen=True)
class Stage:
    name: str
    device: str
    layers: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    param_bytes: int
    macs: int
    sha256: str
    external_data: Mapping[str, str] = field(default_factory=dict)  # file in the plan directory -> its sha256

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


@dataclass(frozen=True)
class Transfer:
    """One tensor moving from a stage (or the requester) to a stage (or the requester)."""

    tensor: str
    src: str
    dst: str
    nbytes: int
    cross_device: bool

    @property
    def between_devices(self) -> bool:
        """Crosses from one device's stage to another's (the requester's feeds and results excluded)."""
        return self.cross_device and SOURCE != self.src and SINK != self.dst


@dataclass(frozen=True)
class Plan:
    model_name: str
    model_sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    cluster: Cluster
    placement: Mapping[str, str]
    stages: tuple[Stage, ...]
    transfers: tuple[Transfer, ...]
    stage_models: Mapping[str, bytes] = field(repr=False, compare=False)
    regions: tuple[Region, ...] = ()
    model_path: str = ""
    seal: signing.Seal | None = field(default=None, repr=False, compare=False)  # set when loaded signed
    standbys: tuple[Standby, ...] = ()  # copies of whole stages on other devices, run while theirs is lost

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise PlanError(f"expected a stage of this plan ({[s.name for s in self.stages]}), got {name!r}")

    def device_stages(self, device: str) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.device == device)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*(s.device for s in self.stages), *(b.device for b in self.standbys)]))

    @property
    def cross_device_transfers(self) -> tuple[Transfer, ...]:
        """Tensors moving between stages on different devices (not the requester's feeds and results)."""
        return tuple(t for t in self.transfers if t.between_devices)

    def wire_bytes(self) -> int:
        """Bytes crossing between devices per inference (the requester's feeds and results not included)."""
        return sum(t.nbytes for t in self.cross_device_transfers)

    def stage_model(self, name: str) -> onnx.ModelProto:
        return onnx.load_from_string(self.stage_models[name])

    def validate(self) -> list[str]:
        """Every structural problem at once (empty list: valid)."""
        problems: list[str] = []
        names = [s.name for s in self.stages]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"stage name {dup!r} is used twice")
        for s in self.stages:
            if s.device not in self.cluster.names:
                problems.append(f"stage {s.name!r} is on device {s.device!r}, which the cluster lacks")
            if s.name not in self.stage_models:
                problems.append(f"stage {s.name!r} has no ONNX model")
            elif not s.external_data and hashlib.sha256(self.stage_models[s.name]).hexdigest() != s.sha256:
                problems.append(f"stage {s.name!r}: its ONNX file's sha256 does not match plan.json (stale or tampered)")
        problems += [p for st in self.stages if st.name in self.stage_models for p in self._interface(st)]
        produced = {t.name for t in self.inputs}
        producer = {}
        for s in self.stages:
            for t in s.outputs:
                producer.setdefault(t, s.name)
        for s in self.stages:
            for t in s.inputs:
                if t not in produced and t not in producer:
                    problems.append(f"stage {s.name!r} needs tensor {t!r}, which no stage produces and is not a model input")
        for out in self.outputs:
            if out.name not in producer and out.name not in produced:
                problems.append(f"model output {out.name!r} is produced by no stage")
        for t in self.transfers:
            for end in (t.src, t.dst):
                if end not in (SOURCE, SINK) and end not in names:
                    problems.append(f"transfer of {t.tensor!r} names stage {end!r}, which the plan lacks")
        problems += self._region_problems(producer)
        problems += standby_problems(self.standbys, {st.name: st.device for st in self.stages}, self.cluster.names)
        if not problems and (cycle := _find_cycle(self)):
            problems.append("stage graph has a cycle: " + " -> ".join(cycle))
        return problems

    def _interface(self, stage: Stage) -> list[str]:
        """The stage file's own inputs and outputs are the ones plan.json gives it (a swapped file is not)."""
        try:
            g = onnx.load_from_string(self.stage_models[stage.name]).graph
        except Exception as exc:  # protobuf raises its own DecodeError
            return [f"stage {stage.name!r}: its file is not an ONNX model ({type(exc).__name__})"]
        inits = {t.name for t in g.initializer}
        ins, outs = {i.name for i in g.input if i.name not in inits}, {o.name for o in g.output}
        problems = []
        if ins != set(stage.inputs) or outs != set(stage.outputs):
            problems.append(f"stage {stage.name!r}: its file reads {sorted(ins)} and writes {sorted(outs)}, but "
                            f"plan.json says it reads {sorted(stage.inputs)} and writes {sorted(stage.outputs)}")
        model_io = {t.name: t for t in (*self.inputs, *self.outputs)}
        for v in (*g.input, *g.output):
            if v.name in model_io and not _same_type(v, model_io[v.name]):
                t = model_io[v.name]
                problems.append(f"stage {stage.name!r}: its file declares {v.name!r} unlike plan.json "
                                f"({t.dtype} {list(t.shape)}); expected the same dtype and shape")
        return problems

    def _region_problems(self, producer: Mapping[str, str]) -> list[str]:
        """The layout's own problems; part and replica nodes in stages on their own device; replica outputs
        exported by a stage (the executors take them from there when the part is lost)."""
        problems = Layout(self.regions, self.placement).validate(self.cluster.names)
        device_of = {n: s.device for s in self.stages for n in s.layers}
        for r in self.regions:
            for i, part in enumerate(r.parts):
                for x, what in ((part, f"part {i}"), *((rep, f"part {i} replica {j}")
                                                       for j, rep in enumerate(part.replicas))):
                    wrong = sorted({device_of.get(n, "no stage") for n in x.nodes} - {x.device})
                    if x.device is not None and wrong:
                        problems.append(f"region {r.name!r} {what}: nodes on {wrong}, expected all on {x.device!r}")
                for j, rep in enumerate(part.replicas):
                    if rep.output not in producer:
                        problems.append(f"region {r.name!r} part {i} replica {j}: output {rep.output!r} is exported "
                                        f"by no stage")
            if r.coded is not None:
                wrong = sorted({device_of.get(n, "no stage") for n in r.coded.nodes} - {r.coded.device})
                if wrong or r.coded.output not in producer:
                    problems.append(f"region {r.name!r} coded part: expected its nodes on {r.coded.device!r} and its "
                                    f"output exported by a stage, got nodes on {wrong or [r.coded.device]}")
        return problems

    def order(self) -> tuple[Stage, ...]:
        """Stages in an order where every stage comes after the stages it reads from."""
        return tuple(self.stages)  # cut() emits them topologically; validate() checks acyclicity

    def save(self, directory: str | Path, force: bool = False, key: signing.Key | None = None) -> Path:
        """Write plan.json and one ONNX file per stage (and plan.sig, signed with `key`, else the key
        `signing.find_key` finds; unsigned without one), nothing half-written on failure. Files in the directory
        that are not the plan's are kept; an existing plan is replaced only with `force`."""
        files = {s.file: self.stage_models[s.name] for s in self.stages}
        files[plandir.PLAN_FILE] = json.dumps(self.to_dict(), indent=1).encode()
        key = key or signing.find_key()
        if key is not None:
            files[signing.SIG_FILE] = signing.signature(key, files[plandir.PLAN_FILE], self._file_hashes())
        return plandir.write(Path(directory), files, force)

    def _file_hashes(self) -> dict[str, str]:
        """The manifest's files: each stage file's sha256 as `save` writes it, and each external data file's as
        plan.json records it."""
        return {s.file: hashlib.sha256(self.stage_models[s.name]).hexdigest() for s in self.stages} | {
            n: h for s in self.stages for n, h in s.external_data.items()}

    def device_seal(self, key: signing.Key | None = None) -> signing.Seal | None:
        """What each device checks its stages against: the signature the plan was loaded with, else (a plan built
        or accepted in this process) one made with `key` or the key found here; None without a key."""
        if self.seal is not None:
            return self.seal
        key = key or signing.find_key()
        if key is None:
            return None
        return signing.sealed(key, json.dumps(self.to_dict(), indent=1).encode(), self._file_hashes())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": {"name": self.model_name, "sha256": self.model_sha256, "path": self.model_path},
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "cluster": self.cluster.to_dict(),
            "placement": dict(self.placement),
            "stages": [
                {
                    "name": s.name,
                    "device": s.device,
                    "file": s.file,
                    "sha256": s.sha256,
                    "layers": list(s.layers),
                    "inputs": list(s.inputs),
                    "outputs": list(s.outputs),
                    "param_bytes": s.param_bytes,
                    "macs": s.macs,
                    **({"external_data": dict(s.external_data)} if s.external_data else {}),
                }
                for s in self.stages
            ],
            "transfers": [
                {"tensor": t.tensor, "src": t.src, "dst": t.dst, "bytes": t.nbytes, "cross_device": t.cross_device}
                for t in self.transfers
            ],
            "regions": [r.to_dict() for r in self.regions],
            **({"standbys": [s.to_dict() for s in self.standbys]} if self.standbys else {}),
        }

    @staticmethod
    def load(directory: str | Path, key: signing.Key | None = None, trust_unsigned: bool = False) -> Plan:
        """Read a plan directory and refuse it if it is not signed with `key` (else the key `signing.find_key`
        finds; `trust_unsigned`: a warning instead), or if any stage file is missing, stale or tampered with."""
        directory = Path(directory)
        path = directory / "plan.json"
        if not path.is_file():
            raise PlanError(f"expected a plan directory containing plan.json, got {str(directory)!r}")
        plan_json = path.read_bytes()
        try:
            d = json.loads(plan_json)
        except ValueError as exc:
            raise PlanError(f"{path} is not a valid plan: not JSON ({type(exc).__name__}: {exc})") from None
        seal = signing.check_directory(directory, plan_json, d, key or signing.find_key(), trust_unsigned)
        try:
            if wrong := plandir.field_problems(d):
                raise PlanError(f"{path} is not a valid plan:\n  " + "\n  ".join(wrong))
            regions = _regions(d, path)
            stages = tuple(
                Stage(s["name"], s["device"], tuple(s["layers"]), tuple(s["inputs"]), tuple(s["outputs"]),
                      int(s["param_bytes"]), int(s["macs"]), s["sha256"], dict(s.get("external_data", {})))
                for s in d["stages"]
            )
            plan_models = {s.name: _stage_bytes(directory, s) for s in stages}
            plan = Plan(
                model_name=d["model"]["name"],
                model_sha256=d["model"]["sha256"],
                inputs=tuple(TensorInfo.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorInfo.from_dict(t) for t in d["outputs"]),
                cluster=Cluster.from_dict(d["cluster"], source=f"{path} cluster"),
                placement=dict(d["placement"]),
                stages=stages,
                transfers=tuple(Transfer(t["tensor"], t["src"], t["dst"], int(t["bytes"]), bool(t["cross_device"])) for t in d["transfers"]),
                stage_models=plan_models,
                regions=regions,
                model_path=d["model"].get("path", ""),
                seal=seal and dataclasses.replace(seal, inlined=frozenset(s.name for s in stages if s.external_data)),
                standbys=tuple(Standby.from_dict(s) for s in d.get("standbys", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise PlanError(f"{path} is not a valid plan: missing or malformed field ({type(exc).__name__}: {exc})") from None
        problems = plan.validate()
        if problems:
            raise PlanError(f"refusing plan {directory}:\n  " + "\n  ".join(problems))
        return plan


def _stage_bytes(directory: Path, stage: Stage) -> bytes:
    """A stage file's model, self-contained: weights kept in other files are read only from files inside the plan
    directory that plan.json lists with their hash (never relative to the working directory)."""
    if Path(stage.file).name != stage.file or stage.name in ("", ".", ".."):
        raise PlanError(f"{directory}: stage name {stage.name!r} is not a plain file name; expected no '/' or '..'")
    f = directory / stage.file
    if not f.is_file():
        raise PlanError(f"{directory}: stage file {stage.file} is missing")
    data = f.read_bytes()
    if not stage.external_data and hashlib.sha256(data).hexdigest() != stage.sha256:
        return data  # validate() reports it, with every other problem
    try:
        model = onnx.load_from_string(data)
    except Exception:  # protobuf's DecodeError: validate() reports it
        return data
    external = [t for t in model.graph.initializer if external_data_helper.uses_external_data(t)]
    if not external:
        return data
    if hashlib.sha256(data).hexdigest() != stage.sha256:
        raise PlanError(f"stage {stage.name!r}: its ONNX file's sha256 does not match plan.json (stale or tampered)")
    root = directory.resolve()
    for t in external:
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        where = f"stage {stage.name!r}: initializer {t.name!r} keeps its data in {location!r}"
        if not target.is_relative_to(root):
            raise PlanError(f"{where}, outside the plan directory {str(root)!r}; refusing to read it")
        if location not in stage.external_data:
            raise PlanError(f"{where}, which plan.json does not list with its sha256 for this stage; refusing it")
        if not target.is_file() or sha256_file(target) != stage.external_data[location]:
            raise PlanError(f"{where}: missing, or its sha256 does not match plan.json (stale or tampered)")
    external_data_helper.load_external_data_for_model(model, str(root))
    return model.SerializeToString()


def _same_type(v: onnx.ValueInfoProto, t: TensorInfo) -> bool:
    """A stage file's declaration of a model input or output agrees with plan.json (open dims match anything)."""
    tt = v.type.tensor_type
    if not tt.HasField("elem_type") or tt.elem_type == 0:
        return True
    if helper.tensor_dtype_to_np_dtype(tt.elem_type).name != t.dtype:
        return False
    if not tt.HasField("shape"):
        return True
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return len(dims) == len(t.shape) and all(a is None or b in (None, "?") or a == b for a, b in zip(dims, t.shape))


def _regions(d: Mapping[str, Any], path: Path) -> tuple[Region, ...]:
    """The typed regions of a plan.json, every unreadable one reported at once; format 1 only without regions."""
    fmt = d.get("format")
    if fmt == FORMAT_1:
        if d.get("regions"):
            raise PlanError(f"{path}: a format-1 plan ({FORMAT_1!r}) with horizontal regions; this edgesplit reads "
                            f"{FORMAT!r}, whose regions are typed (units, combine, replicas). Re-create the plan with "
                            f"`edgesplit partition` from its model ({d.get('model', {}).get('path') or 'see model.path'})")
        return ()
    if fmt != FORMAT:
        raise PlanError(f"{path}: expected format {FORMAT!r} (or {FORMAT_1!r}), got {fmt!r}")
    if not isinstance(d.get("regions", []), list):
        raise PlanError(f"{path}: expected 'regions' to be a list, got {type(d['regions']).__name__}")
    regions, problems = regions_from_dicts(d.get("regions", []))
    if problems:
        raise PlanError(f"refusing plan {path.parent}: unreadable regions:\n  " + "\n  ".join(problems))
    return regions


def _find_cycle(plan: Plan) -> list[str]:
    producer = {t: s.name for s in plan.stages for t in s.outputs}
    deps = {s.name: {producer[t] for t in s.inputs if t in producer} for s in plan.stages}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(deps[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return []

    for s in plan.stages:
        if s.name not in state and (c := visit(s.name)):
            return c
    return []


def _wiring(graph: Graph, groups: list[tuple[str, list[str]]],
            exported: set[str]) -> tuple[dict[str, int], dict[str, set[int]], list[list[str]]]:
    """The stage producing each tensor, the other stages reading it, and each stage's outputs."""
    producer_stage = {t: idx for idx, (_, members) in enumerate(groups)
                      for n in members for t in graph.layer(n).outputs}
    consumers: dict[str, set[int]] = defaultdict(set)
    for idx, (_, members) in enumerate(groups):
        for name in members:
            for t in graph.layer(name).inputs:
                if producer_stage.get(t) != idx:
                    consumers[t].add(idx)
    outputs = [[t for n in members for t in graph.layer(n).outputs
                if t in exported or any(c != idx for c in consumers.get(t, ()))]
               for idx, (_, members) in enumerate(groups)]
    return producer_stage, consumers, outputs


def cut(graph: Graph, cluster: Cluster, placement: Mapping[str, str]) -> Plan:
    """Turn a complete placement into stages whose dependency graph is a DAG, and the transfers between them."""
    # replica nodes get stages of their own, so a standby replica costs nothing until its part is lost
    extra = [(*region.replicas, *((region.coded,) if region.coded else ())) for region in graph.regions]
    replica_of = {n: r.output for copies in extra for r in copies for n in r.nodes}  # coded parts too
    keyed = {n: f"{d}\0{replica_of[n]}" if n in replica_of else d for n, d in placement.items()}
    groups = [(key.split("\0")[0], members) for key, members in stage_groups(graph, keyed)]
    # a replica's output feeds no node: the executors take it from its stage when its part is lost
    exported = set(graph.outputs) | {r.output for copies in extra for r in copies}
    while True:  # a stage nobody reads from (its nodes copied onto every reader by the exchange) is dropped
        producer_stage, consumers, outputs = _wiring(graph, groups, exported)
        if all(outputs):
            break
        groups = [g for g, outs in zip(groups, outputs) if outs]
    names = [f"s{i}_{device}" for i, (device, _) in enumerate(groups)]
    stages, models, transfers = [], {}, []
    for idx, (device, members) in enumerate(groups):
        member_set = set(members)
        ins = list(dict.fromkeys(t for n in members for t in graph.layer(n).inputs if producer_stage.get(t) != idx))
        outs = outputs[idx]
        data = _stage_model(graph, [n for n in (l.name for l in graph.layers) if n in member_set], ins, outs, names[idx])
        models[names[idx]] = data
        stages.append(Stage(
            name=names[idx], device=device, layers=tuple(members), inputs=tuple(ins), outputs=tuple(outs),
            param_bytes=sum(graph.tensors[w].nbytes for w in {w for n in members for w in graph.layer(n).weights}),
            macs=sum(graph.layer(n).macs for n in members), sha256=hashlib.sha256(data).hexdigest(),
        ))
        for t in ins:
            src = producer_stage.get(t)
            src_name, src_device = (SOURCE, None) if src is None else (names[src], groups[src][0])
            transfers.append(Transfer(t, src_name, names[idx], graph.tensors[t].nbytes, src_device != device))
    for t in graph.outputs:
        src = producer_stage.get(t)
        transfers.append(Transfer(t, SOURCE if src is None else names[src], SINK, graph.tensors[t].nbytes, True))
    tensor = graph.tensors
    return Plan(
        model_name=graph.name,
        model_sha256=graph.sha256,
        inputs=tuple(tensor[t] for t in graph.inputs),
        outputs=tuple(tensor[t] for t in graph.outputs),
        cluster=cluster,
        placement=dict(placement),
        stages=tuple(stages),
        transfers=tuple(transfers),
        stage_models=models,
        regions=graph.regions,
        model_path=graph.path,
    )


def _stage_model(graph: Graph, layers: list[str], inputs: list[str], outputs: list[str], name: str) -> bytes:
    src = graph.model
    wanted = set(layers)
    nodes = [n for n in src.graph.node if n.name in wanted]
    inits = graph.initializers
    needed = list(dict.fromkeys(r for n in nodes for r in node_references(n) if r in inits))
    vi = {v.name: v for v in (*src.graph.input, *src.graph.value_info, *src.graph.output)}
    internal = {o for n in nodes for o in n.output} - set(outputs)

    def declared(t: str) -> onnx.ValueInfoProto:
        if t in vi and vi[t].type.tensor_type.HasField("shape"):
            return vi[t]
        # shape known only from a probe run: declare the type, leave the shape open (it may be dynamic)
        return helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(np.dtype(graph.tensors[t].dtype)), None)

    g = helper.make_graph(
        nodes,
        name,
        [declared(t) for t in inputs],
        [declared(t) for t in outputs],
        initializer=[inits[t] for t in needed],
        value_info=[vi[t] for t in internal if t in vi],
    )
    model = helper.make_model(g, opset_imports=src.opset_import, ir_version=src.ir_version, producer_name="edgesplit")
    return model.SerializeToString()
