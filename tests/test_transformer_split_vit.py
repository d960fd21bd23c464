"""The project's own MNIST ViT (shipped with the package), split by heads and neurons, against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

import edgesplit
from edgesplit.datasets import shipped_model
from edgesplit.runtime import run_whole_model


@pytest.mark.parametrize("speeds", [(1, 1), (1, 1, 1), (1, 1, 1, 1), (3, 1, 1, 1, 2)], ids=["2", "3", "4", "uneven-5"])
def test_shipped_vit_head_split_matches_whole_model(speeds):
    path = shipped_model("mnist_vit")
    graph = edgesplit.load(path)
    cluster = edgesplit.Cluster(tuple(edgesplit.Device(f"d{i}", 1, 2**30, speed=s) for i, s in enumerate(speeds)))
    plan = edgesplit.partition(graph, cluster, strategy="heads")
    assert {s.device for s in plan.stages} == set(cluster.names)
    sums_per_block = {}
    for region in plan.regions:
        if region.kind in ("heads", "neurons"):
            block = region.name.split("/")[2]
            sums_per_block[block] = sums_per_block.get(block, 0) + 1
    assert sums_per_block and set(sums_per_block.values()) == {2}  # one reduction per attention and per MLP
    x = {"input": np.random.default_rng(len(speeds)).random((3, 1, 28, 28), dtype=np.float32)}
    got = edgesplit.LocalExecutor(plan).run(x).outputs["logits"]
    want = run_whole_model(path, x)["logits"]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-4
