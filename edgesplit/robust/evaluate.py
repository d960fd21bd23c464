"""A replication policy measured: the metric of a plan under every failure set of the asked sizes.

Each plan runs in one `LocalExecutor(plan, allow_degraded=True)` (it caches one route per failure set), on batches
of the evaluated samples. Devices that hold nodes outside every region's parts (combines, unsplit layers) cannot
fail without the request failing; they are left out of the failure sets and named (`fatal`). The metric is top-1
accuracy with labels, else top-1 agreement with the unsplit model (a classifier: one score vector per sample), else
the cosine similarity of the outputs to the unsplit model's (embeddings), averaged over samples and positions;
`neighbours` (asked for) scores embeddings by the agreement of each sample's nearest neighbour among the samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgesplit.cluster import Cluster
from edgesplit.errors import DeviceFailedError, InputError
from edgesplit.graph import Graph
from edgesplit.layout import Choice
from edgesplit.plan import Plan
from edgesplit.planner import plan as plan_of
from edgesplit.planner import with_replicas
from edgesplit.robust.importance import Importance, importance
from edgesplit.rewrite.coded import add_coded, placement_with
from edgesplit.robust.policies import Fractions, Policy, coded, replicas
from edgesplit.runtime.local import LocalExecutor, run_whole_model

BATCH = 256
FailureSet = tuple[str, ...]


class Metric(Choice):
    ACCURACY = "accuracy"
    AGREEMENT = "agreement"
    COSINE = "cosine"
    NEXT_TOKEN = "next-token"  # a language model: agreement of the next-token argmax at every position
    NEIGHBOURS = "neighbours"  # embeddings: each sample's nearest other sample (cosine) the unsplit model's


@dataclass(frozen=True)
class Samples:
    """Arrays keyed by the model's input names, sharing a leading sample axis; optional integer labels."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, rows: slice) -> Samples:
        labels = None if self.labels is None else self.labels[rows]
        return Samples({k: v[rows] for k, v in self.inputs.items()}, labels)


@dataclass(frozen=True)
class Row:
    """One policy at one r: its cost against the plain split and its metric fault-free and per failure set."""

    policy: Policy
    r: float
    memory_vs_plain: float
    macs_vs_plain: float
    fault_free: float
    failures: Mapping[int, Mapping[FailureSet, float | None]] = field(default_factory=dict)  # None: request failed
    importance: str = ""  # set when rows of several importance scores are compared
    perplexity: Mapping[FailureSet, float] = field(default_factory=dict)  # language models with tokens; () fault-free

    def worst_perplexity(self, size: int) -> float:
        """The highest over the sets of this size answered (inf if none was)."""
        return max((v for s, v in self.perplexity.items() if len(s) == size), default=float("inf"))

    def mean_perplexity(self, size: int) -> float:
        values = [v for s, v in self.perplexity.items() if len(s) == size]
        return float(np.mean(values)) if values else float("inf")

    def mean(self, size: int) -> float:
        return float(np.mean([v or 0.0 for v in self.failures[size].values()]))

    def worst(self, size: int) -> float:
        return float(min(v or 0.0 for v in self.failures[size].values()))

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"policy": self.policy.value, "r": self.r}
        if self.importance:
            d["importance"] = self.importance
        return {**d, "memory_vs_plain": self.memory_vs_plain, "macs_vs_plain": self.macs_vs_plain,
                "fault_free": self.fault_free,
                "failures": {str(k): {"mean": self.mean(k), "worst": self.worst(k),
                                      "sets": [{"failed": list(s), "value": v} for s, v in sets.items()]}
                             for k, sets in self.failures.items()}, **self._perplexity_dict()}

    def _perplexity_dict(self) -> dict[str, object]:
        if not self.perplexity:
            return {}
        sizes = sorted({len(s) for s in self.perplexity if s})
        return {"perplexity": {"fault_free": self.perplexity[()], **{
            str(k): {"mean": self.mean_perplexity(k), "worst": self.worst_perplexity(k)} for k in sizes}}}


def choose_metric(plan: Plan, labels: np.ndarray | None, override: Metric | str | None = None,
                  vocabulary: int | None = None, output: str | None = None,
                  reference: np.ndarray | None = None) -> Metric:
    """Accuracy with labels; else from the scored output's shape: [batch, sequence, vocabulary] scores over the
    token embedding's rows (a language model) give next-token agreement, one score vector per sample gives
    agreement unless the unsplit model's vectors are all of unit length (a normalised embedding), anything else
    cosine similarity."""
    if override is not None:
        metric = Metric.parse(override, "--metric")
        if metric is Metric.ACCURACY and labels is None:
            raise InputError("--metric accuracy needs a 'labels' array in the data; got none")
        return metric
    if labels is not None:
        return Metric.ACCURACY
    shape = next(t for t in plan.outputs if t.name == (output or plan.outputs[0].name)).shape
    if len(shape) == 3 and vocabulary is not None and shape[-1] == vocabulary:
        return Metric.NEXT_TOKEN
    if reference is not None and reference.ndim == 2 and \
            np.allclose(np.linalg.norm(reference.astype(np.float64), axis=-1), 1.0, atol=1e-3):
        return Metric.COSINE
    return Metric.AGREEMENT if len(shape) == 2 and not (isinstance(shape[1], int) and shape[1] < 2) else Metric.COSINE


def score(metric: Metric, output: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
          mask: np.ndarray | None = None) -> float:
    if metric is Metric.ACCURACY:
        return float(np.mean(np.argmax(output, axis=-1) == labels))
    if metric in (Metric.AGREEMENT, Metric.NEXT_TOKEN):
        same = np.argmax(output, axis=-1) == np.argmax(reference, axis=-1)
        return float(np.average(same, weights=mask)) if mask is not None and mask.shape == same.shape \
            else float(np.mean(same))
    if metric is Metric.NEIGHBOURS:
        return neighbour_agreement(output, reference)
    a, b = output.astype(np.float64), reference.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12)))


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Per sample, the index of the most cosine-similar other sample (each sample's values flattened)."""
    v = embeddings.reshape(len(embeddings), -1).astype(np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    similarity = v @ v.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def neighbour_agreement(output: np.ndarray, reference: np.ndarray) -> float:
    """The share of samples whose nearest neighbour among the samples is the one the unsplit model gives."""
    return float(np.mean(nearest_neighbours(output) == nearest_neighbours(reference)))


def perplexity(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray | None = None) -> float:
    """exp of the mean negative log-likelihood of each next token (positions 1..) under the logits before it."""
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_p, tokens[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    weights = None if mask is None else (mask[:, 1:] * mask[:, :-1]).astype(np.float64)
    return float(np.exp(np.average(nll, weights=weights)))


def token_inputs(source: Graph) -> tuple[str | None, int | None]:
    """(the integer model input a Gather uses to index a constant table — the token ids —, the table's rows)."""
    consts = {t.name: t for t in source.model.graph.initializer}
    for node in source.model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in source.inputs and \
                node.input[0] in consts and len(consts[node.input[0]].dims) == 2:
            return node.input[1], int(consts[node.input[0]].dims[0])
    return None, None


def fatal_devices(plan: Plan) -> list[str]:
    """Devices whose loss alone fails the request even with degraded answers allowed."""
    router = LocalExecutor(plan, allow_degraded=True).router
    fatal = []
    for device in plan.devices:
        try:
            router.route(frozenset({device}))
        except DeviceFailedError:
            fatal.append(device)
    return fatal


def failure_sets(devices: Sequence[str], sizes: Sequence[int]) -> dict[int, list[FailureSet]]:
    return {k: list(itertools.combinations(devices, k)) for k in sizes}


def run_batched(executor: LocalExecutor, samples: Samples, failed: FailureSet = (), batch: int = BATCH,
                output: str | None = None) -> np.ndarray:
    """The plan's first output (or `output`) over all samples (raises DeviceFailedError if the failure set is
    fatal)."""
    name = output or executor.plan.outputs[0].name
    parts = [executor.run(samples.take(slice(i, i + batch)).inputs, failed=failed).outputs[name]
             for i in range(0, len(samples), batch)]
    return np.concatenate(parts, axis=0)


def max_param_bytes(plan: Plan) -> int:
    return max(sum(s.param_bytes for s in plan.device_stages(d)) for d in plan.devices)


def max_macs(plan: Plan) -> int:
    """Per device, the MACs of all its stages, standby replicas counted (what it computes once a part is lost)."""
    return max(sum(s.macs for s in plan.device_stages(d)) for d in plan.devices)


@dataclass(frozen=True)
class CodedMemory:
    """The parity policy's cost on the layers it codes: max per-device parameter bytes, coded and plain."""

    regions: tuple[str, ...]
    coded_bytes: int
    plain_bytes: int
    devices: int

    @property
    def ratio(self) -> float:
        return self.coded_bytes / self.plain_bytes

    @property
    def bound(self) -> float:
        """N/(N−1): what holding one extra part's worth of the layer costs."""
        return self.devices / (self.devices - 1)

    def to_dict(self) -> dict[str, object]:
        return {"regions": list(self.regions), "memory_vs_plain": self.ratio, "bound": self.bound}


def region_param_bytes(graph: Graph, names: Sequence[str]) -> int:
    """The max over devices of the parameter bytes of the named regions' parts and coded parts on each."""
    per_device: dict[str, int] = {}
    for region in graph.regions:
        if region.name not in names:
            continue
        holders = [(p.device, p.nodes) for p in region.parts] + \
            ([(region.coded.device, region.coded.nodes)] if region.coded else [])
        for device, nodes in holders:
            weights = {w for n in nodes for w in graph.layer(n).weights}
            per_device[str(device)] = per_device.get(str(device), 0) + sum(graph.tensors[w].nbytes for w in weights)
    return max(per_device.values(), default=0)


@dataclass(frozen=True)
class Study:
    """Everything one `robustness` run compares, evaluated by `run`."""

    graph: Graph  # the rewritten graph: regions with their parts on devices
    placement: Mapping[str, str]
    cluster: Cluster
    samples: Samples
    metric: Metric
    reference: np.ndarray  # the unsplit model's first output on the samples
    plain: Plan
    fatal: tuple[str, ...]
    sets: Mapping[int, Sequence[FailureSet]]
    tokens: str | None = None  # the input holding token ids (language models)
    mask: str | None = None  # the attention mask input of the same shape, weighting positions
    output: str | None = None  # the model output scored (default: the first)

    def plan(self, policy: Policy, r: Fractions, scores: Mapping[str, np.ndarray] | None, f: int = 1) -> Plan:
        if policy is Policy.PARITY:
            graph, placement = self.coded_layout()
        else:
            graph, placement = with_replicas(self.graph, self.placement, replicas(self.graph, policy, scores, r, f=f))
        return plan_of(graph, self.cluster, placement)

    def coded_layout(self) -> tuple[Graph, dict[str, str]]:
        """The parity policy's graph (its linear regions coded) and placement."""
        graph, added = add_coded(self.graph, coded(self.graph))
        return graph, placement_with(self.placement, graph, added)

    def coded_memory(self) -> CodedMemory:
        """The coded regions' max per-device parameter bytes, against the same regions' in the plain split."""
        graph, _ = self.coded_layout()
        regions = [r for r in graph.regions if r.coded is not None]
        names = tuple(r.name for r in regions)
        devices = max(len(r.parts) + 1 for r in regions)
        return CodedMemory(names, region_param_bytes(graph, names), region_param_bytes(self.graph, names), devices)

    def evaluate(self, policy: Policy, r: float, plan: Plan,
                 on_step: Callable[[], None] = lambda: None) -> Row:
        executor = LocalExecutor(plan, allow_degraded=True)
        values: dict[FailureSet, float | None] = {}
        ppl: dict[FailureSet, float] = {}
        for s in [(), *(s for sets in self.sets.values() for s in sets)]:
            values[s], p = self._score(executor, s)
            if p is not None:
                ppl[s] = p
            on_step()
        failures = {size: {s: values[s] for s in sets} for size, sets in self.sets.items()}
        return Row(policy, r, max_param_bytes(plan) / max_param_bytes(self.plain),
                   max_macs(plan) / max_macs(self.plain), values[()], failures, perplexity=ppl)

    def single_failures(self, plan: Plan) -> dict[FailureSet, float | None]:
        """The metric under each single failure only (a replicated plan's fault-free answer is the plain one's)."""
        executor = LocalExecutor(plan, allow_degraded=True)
        return {s: self._score(executor, s)[0] for s in failure_sets(self.holders, (1,))[1]}

    @property
    def holders(self) -> list[str]:
        """The devices whose loss the failure sets range over."""
        return [d for d in self.plain.devices if d not in self.fatal and any(p.device == d for r in self.plain.regions
                                                                            for p in r.parts)]

    def _score(self, executor: LocalExecutor, failed: FailureSet) -> tuple[float | None, float | None]:
        """The metric on every sample, and the perplexity for a language model whose tokens the data gives."""
        try:
            output = run_batched(executor, self.samples, failed, output=self.output)
        except DeviceFailedError:
            return None, None
        mask = self.samples.inputs.get(self.mask) if self.mask else None
        value = score(self.metric, output, self.reference, self.samples.labels, mask)
        if self.metric is not Metric.NEXT_TOKEN or not self.tokens:
            return value, None
        return value, perplexity(output, self.samples.inputs[self.tokens], mask)

    @property
    def steps_per_row(self) -> int:
        return 1 + sum(len(s) for s in self.sets.values())


def prepare(rewritten: Graph, placement: Mapping[str, str], cluster: Cluster, source: Graph, samples: Samples,
            sizes: Sequence[int], metric: Metric | str | None = None, output: str | None = None) -> Study:
    """A study of the rewritten graph's regions on the evaluated samples, failure sets of the given sizes,
    scoring `output` (default: the model's first)."""
    if output is not None and output not in source.outputs:
        raise InputError(f"expected an output of the model ({list(source.outputs)}) to score, got {output!r}")
    plain = plan_of(rewritten, cluster, placement)
    fatal = fatal_devices(plain)
    holders = [d for d in plain.devices if d not in fatal and any(p.device == d for r in plain.regions
                                                                     for p in r.parts)]
    too_big = [k for k in sizes if k > len(holders)]
    if too_big:
        raise InputError(f"expected failure sizes of at most {len(holders)} (devices holding parts whose loss is not "
                         f"fatal: {holders}; fatal: {fatal}), got {too_big}")
    tokens, vocabulary = token_inputs(source)
    reference = _whole(source, samples, output or plain.outputs[0].name)
    chosen = choose_metric(plain, samples.labels, metric, vocabulary, output, reference)
    mask = next((n for n in source.inputs if "mask" in n.lower() and tokens and
                 samples.inputs[n].shape == samples.inputs[tokens].shape), None)
    return Study(rewritten, dict(placement), cluster, samples, chosen, reference, plain, tuple(fatal),
                 failure_sets(holders, sizes), tokens, mask, output)


def _whole(source: Graph, samples: Samples, name: str) -> np.ndarray:
    return np.concatenate([run_whole_model(source.model, samples.take(slice(i, i + BATCH)).inputs)[name]
                           for i in range(0, len(samples), BATCH)], axis=0)


def scores_for(study: Study, method: Importance | str, calibration: Samples | None) -> dict[str, np.ndarray]:
    return importance(study.graph, method, None if calibration is None else dict(calibration.inputs))
