"""Transformer split on the real exports of `edgesplit.bench.transformers_zoo` (MiniLM, SmolLM2, GPT-2 with cache).

Exports are cached in the zoo's directory ($EDGESPLIT_CACHE), shared with the other tests. SmolLM2 (135M
parameters, 30 blocks) takes minutes on a small machine: marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest

import transformers  # noqa: F401  (the test extra installs it: a broken install fails here)
from edgesplit.bench import transformers_zoo as zoo  # noqa: E402

from edgesplit.cluster import Cluster  # noqa: E402
from edgesplit.graph import load  # noqa: E402
from edgesplit.plan import cut  # noqa: E402
from edgesplit.place.heads import split_heads  # noqa: E402
from edgesplit.runtime.generate import TextTokenizer, generate  # noqa: E402
from edgesplit.runtime.local import LocalExecutor, run_whole_model  # noqa: E402

SENTENCES = [
    "Edge devices can share the work of one model.",
    "The cat sat quietly on the warm windowsill.",
    "Tensor parallelism splits every layer across machines.",
]
KV_DIMS = {"batch": 1, "sequence": 6, "past_sequence": 4, "total_sequence": 10}


class _Ids:
    """Token ids as text: generation from ids needs no vocabulary."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_sentence_embeddings(tmp_path) -> None:
    export = zoo.minilm(zoo.default_cache_dir())
    graph = load(export.path)
    cluster = Cluster.simulated(3)
    split, placement = split_heads(graph, cluster)  # 12 heads, 1536 neurons over 3 devices
    assert split.blocks == 6 and split.skipped == ()
    assert sum(n.op_type == "Sum" for n in split.graph.model.graph.node) == 12
    plan = cut(split.graph, cluster, placement)
    executor = LocalExecutor(plan)
    got = zoo.embed(lambda feeds: executor.run(feeds).outputs, export.tokenizer, SENTENCES)
    ref = zoo.embed(lambda feeds: run_whole_model(graph.model, feeds), export.tokenizer, SENTENCES)
    assert np.all(_cos(got, ref) >= 0.99999), _cos(got, ref)


def test_gpt2_with_sharded_kv_cache_generates_the_same_tokens() -> None:
    graph = load(zoo.gpt2(zoo.default_cache_dir(), kv_cache=True).path)  # 6 heads
    cluster = Cluster.simulated(4)
    split, placement = split_heads(graph, cluster, dims=KV_DIMS, kv_cache="shard")
    assert "past_key_0.p3" in split.graph.inputs and "present_key_0.p3" in split.graph.outputs
    plan = cut(split.graph, cluster, placement)
    tok = TextTokenizer(_Ids())
    want = generate(graph.model, tok, [3, 14, 15, 92], 16, stop_at_eos=False).ids()
    gen = generate(plan, tok, [3, 14, 15, 92], 16, stop_at_eos=False)
    assert gen.ids() == want
    # only hidden states, partial sums and the small shape vectors riding with them cross devices: no cache
    assert not any("past" in t or "present" in t for t in gen.stats.crossed)


@pytest.mark.slow
def test_smollm2_logits_match() -> None:
    graph = load(zoo.smollm2(zoo.default_cache_dir(), kv_cache=False).path)
    cluster = Cluster.simulated(3)  # 9 heads / 3 KV heads: one KV group per device
    split, placement = split_heads(graph, cluster, dims={"batch": 1, "sequence": 6, "total_sequence": 6})
    assert split.blocks == 30 and split.skipped == ()
    plan = cut(split.graph, cluster, placement)
    feeds = zoo.decoder_feeds(np.array([[1, 4093, 28, 253, 5248, 30]]))
    got = LocalExecutor(plan).run(feeds).outputs["logits"]
    ref = run_whole_model(graph.model, feeds)["logits"]
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-4


@pytest.mark.slow
def test_smollm2_sharded_cache_greedy_tokens() -> None:
    export = zoo.smollm2(zoo.default_cache_dir(), kv_cache=True)
    graph = load(export.path)
    cluster = Cluster.simulated(2)
    split, placement = split_heads(graph, cluster, dims=KV_DIMS, kv_cache="shard", allow_idle=True)
    plan = cut(split.graph, cluster, placement)
    prompt = [1, 4093, 28, 253, 5248, 30]
    want = generate(graph.model, export.tokenizer, prompt, 32, stop_at_eos=False).ids()
    assert generate(plan, export.tokenizer, prompt, 32, stop_at_eos=False).ids() == want
