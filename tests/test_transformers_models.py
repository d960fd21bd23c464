"""Real Transformers exported offline to ONNX, then split vertically: every plan matches the unsplit model.

Exports are cached on disk (edgesplit.bench.transformers_zoo.default_cache_dir(), or $EDGESPLIT_CACHE) so only
the first session pays for them; SmolLM2 is exported once per cache and loaded once per test session.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import transformers  # noqa: F401  (the test extra installs it: a broken install fails here)
import torch

from edgesplit.bench import transformers_zoo as tz  # noqa: E402
from edgesplit.compare import compare  # noqa: E402
from edgesplit.runtime.local import LocalExecutor, run_whole_model  # noqa: E402

RTOL = 1e-4
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices can share one neural network, each computing some of its layers.",
    "A cat is sleeping on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "Split inference keeps the data close to where it is produced.",
]


@pytest.fixture(scope="session")
def cache():
    return tz.default_cache_dir()


@pytest.fixture(scope="session")
def minilm(cache):
    return tz.minilm(cache)


@pytest.fixture(scope="session")
def gpt2(cache):
    return {kv: tz.gpt2(cache, kv_cache=kv) for kv in (False, True)}


@pytest.fixture(scope="session")
def smollm2(cache):
    return {kv: tz.smollm2(cache, kv_cache=kv) for kv in (False, True)}


def _decoder_inputs(graph, ids: np.ndarray, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = tz.decoder_feeds(ids, past)
    rng = np.random.default_rng(seed)
    for name in graph.inputs:
        if name.startswith("past_"):
            _, heads, _, dim = graph.tensors[name].shape
            feeds[name] = rng.standard_normal((ids.shape[0], heads, past, dim)).astype(np.float32)
    return feeds


def _check_splits(path, inputs, devices=(2, 3, 4)) -> None:
    """Vertical plans on `devices` simulated devices match the whole model within RTOL on every output."""
    reference = run_whole_model(path, inputs)
    for n in devices:
        plan = tz.vertical_plan(path, n)
        assert plan.validate() == []
        assert len(plan.devices) == n
        got = LocalExecutor(plan).run(inputs).outputs
        diffs = compare(got, reference, RTOL)
        assert all(d.ok for d in diffs), (n, [d for d in diffs if not d.ok])


# ---------------------------------------------------------------------------------------------------- MiniLM


def test_minilm_export_matches_transformers(cache, minilm):
    ref = tz.minilm_reference(cache, SENTENCES)  # transformers' own embeddings, computed once per cache
    got = tz.embed(lambda f: run_whole_model(minilm.path, f), minilm.tokenizer, SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    sims = got @ got.T  # the semantics survive: the two sentences about splitting are closer than unrelated ones
    assert sims[1, 4] > sims[1, 3]


def test_minilm_splits_match_unsplit_on_real_sentences(minilm):
    """Every output within 1e-4 and sentence embeddings with cosine >= 0.99999, on 2, 3 and 4 devices."""
    whole = {}
    tz.embed(lambda f: whole.update(run_whole_model(minilm.path, f)) or whole, minilm.tokenizer, SENTENCES)
    for n in (2, 3, 4):
        plan = tz.vertical_plan(minilm.path, n)
        assert plan.validate() == [] and len(plan.devices) == n
        got = {}
        executor = LocalExecutor(plan)
        tz.embed(lambda f: got.update(executor.run(f).outputs) or got, minilm.tokenizer, SENTENCES)
        assert all(d.ok for d in compare(got, whole, RTOL)), n
        a, b = whole["sentence_embedding"], got["sentence_embedding"]
        cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() >= 0.99999, n


# ---------------------------------------------------------------------------------------------------- GPT-2


@pytest.mark.parametrize("kv", [False, True], ids=["no-cache", "kv-cache"])
def test_gpt2_export_matches_transformers(gpt2, kv):
    model = tz.gpt2_model()
    ids = np.random.default_rng(1).integers(0, 512, (2, 9))
    past = 5 if kv else 0
    feeds = tz.decoder_feeds(ids[:, past:], past)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()[:, past:]
        if kv:
            cache = model(torch.tensor(ids[:, :past]), use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = layer.keys.numpy(), layer.values.numpy()
    got = run_whole_model(gpt2[kv].path, feeds)["logits"]
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()


@pytest.mark.parametrize("kv", [False, True], ids=["no-cache", "kv-cache"])
def test_gpt2_split_matches_unsplit(gpt2, kv):
    past = 4 if kv else 0
    graph = tz.graph(gpt2[kv].path)
    ids = np.random.default_rng(2).integers(0, 512, (2, 6))
    _check_splits(gpt2[kv].path, _decoder_inputs(graph, ids, past))


def test_gpt2_kv_graph_reads_past_only_in_its_concat(gpt2):
    """The property token generation relies on: no Shape or mask node reads a past tensor."""
    graph = tz.graph(gpt2[True].path)
    consumers = graph.consumers()
    for name in graph.inputs:
        if name.startswith("past_"):
            ops = {graph.layer(c).op_type for c in consumers[name]}
            assert ops == {"Concat"}, (name, ops)


# ---------------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_exports_are_cached(cache, smollm2):
    again = tz.smollm2(cache, kv_cache=True)
    assert again.path == smollm2[True].path
    assert smollm2[True].info["settings"]["kv_cache"] is True
    assert smollm2[False].path != smollm2[True].path
    assert (smollm2[True].directory / "tokenizer.json").is_file()


@pytest.mark.slow
def test_smollm2_kv_splits_match_unsplit(smollm2):
    """2, 3 and 4 devices; a random 3-position cache so that the past matters."""
    graph = tz.graph(smollm2[True].path)
    ids = np.array([[504, 3575, 282, 4649, 314]])
    _check_splits(smollm2[True].path, _decoder_inputs(graph, ids, past=3, seed=3))


@pytest.mark.slow
def test_smollm2_matches_transformers_and_splits(cache, smollm2):
    """The no-cache export against transformers' own logits, and split on 3 devices against itself.

    (The cached export is checked against transformers by token generation in test_generate.py.)"""
    ids = np.array([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    ref = tz.smollm2_logits(cache, ids[0])  # computed by transformers once per cache
    feeds = tz.decoder_feeds(ids)
    whole = run_whole_model(smollm2[False].path, feeds)["logits"]
    assert np.abs(whole - ref).max() <= RTOL * np.abs(ref).max()
    assert (whole[0].argmax(-1) == ref[0].argmax(-1)).all()
    assert whole[0, -1].argmax() == 7042  # " Paris"
    plan = tz.vertical_plan(smollm2[False].path, 3)
    got = LocalExecutor(plan).run(feeds).outputs["logits"]
    assert np.abs(got - whole).max() <= RTOL * np.abs(whole).max()
