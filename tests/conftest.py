"""Shared fixtures: the zoo of small CNNs, exported once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ZOO = ("resnet", "densenet", "vgg", "mobilenet", "inception")
PLAN_SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "plan.schema.json"


def schema_problems(plan_json: Path) -> list[str]:
    """Where a written plan.json breaks docs/plan.schema.json (empty: it follows the documented format)."""
    import json

    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(PLAN_SCHEMA.read_text()))
    data = json.loads(plan_json.read_text())
    return [f"{plan_json}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


@pytest.fixture(scope="session", autouse=True)
def every_written_plan_follows_the_schema():
    """Every plan a test writes (Plan.save, also under the CLI) validates against docs/plan.schema.json."""
    from edgesplit.plan import Plan

    save = Plan.save

    def checked(self, directory):
        written = save(self, directory)
        problems = schema_problems(Path(written) / "plan.json")
        assert not problems, "the written plan breaks docs/plan.schema.json:\n" + "\n".join(problems[:20])
        return written

    Plan.save = checked
    yield
    Plan.save = save


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


GPT2_VOCAB = 512  # the random GPT-2 of edgesplit.bench.transformers_zoo


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer over the random GPT-2's ids: w0 .. w511, w511 is end-of-sequence."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(GPT2_VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"w{GPT2_VOCAB - 1}"}))
    return d


def assert_plan_matches(plan, graph, batch: int = 2, rtol: float = 1e-5) -> None:
    """The plan's outputs equal the whole model's (one onnxruntime session) within `rtol` of the largest value."""
    import edgesplit
    from edgesplit.runtime import random_inputs, run_whole_model

    x = random_inputs(plan.inputs, {"batch": batch}, seed=batch)
    got = edgesplit.LocalExecutor(plan, threads=1).run(x).outputs
    ref = run_whole_model(graph.model, x, threads=1)
    for name, want in ref.items():
        assert got[name].shape == want.shape
        err = np.max(np.abs(got[name] - want)) / max(np.max(np.abs(want)), 1e-30)
        assert err <= rtol, f"{name}: relative error {err:.2e}"
