"""Shared fixtures: the zoo of small CNNs, exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ZOO = ("resnet", "densenet", "vgg", "mobilenet", "inception")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgesplit.bench.zoo import build

    directory = tmp_path_factory.mktemp("zoo")
    for name in ZOO:
        build(name, directory)
    return directory


@pytest.fixture(scope="session")
def zoo_graphs(zoo_dir: Path) -> dict:
    import edgesplit

    return {name: edgesplit.load(zoo_dir / f"{name}.onnx") for name in ZOO}
