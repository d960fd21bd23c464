"""Small Transformers exported by both torch exporters, for the transformer-split tests and benchmark (torch only).

`export(kind, directory, exporter)` writes `<kind>_<exporter>.onnx` (the dynamo exporter adds external data) and
returns its path. Kinds: gpt2 (fused c_attn, Conv1D as Gemm), gpt2-12 (12 heads), bert (separate Q/K/V, padding
mask), bert6 (6 heads), llama (GQA 6 heads / 2 KV heads, rotary, SwiGLU, tied LM head), llama93 (9/3 like
SmolLM2), vit (plain torch pre-norm encoder, fused qkv chunked), vit-timm (qkv reshaped to [B, N, 3, H, d] and
unbound, as timm does), vit-talking (CaiT's talking heads: scores mixed across heads, which no head split can
follow: the fallback case).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import torch
import transformers
from torch import nn  # noqa: E402

KINDS = ("gpt2", "gpt2-12", "bert", "bert6", "llama", "llama93", "vit", "vit-timm", "vit-talking")


class _Out(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, timm: bool, talking: bool = False) -> None:
        super().__init__()
        self.heads, self.timm = heads, timm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mix = nn.Linear(heads, heads) if talking else None  # CaiT's talking heads: scores mixed across heads

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        if self.timm:
            q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        att = q @ k.transpose(-2, -1) * d ** -0.5
        if self.mix is not None:
            att = self.mix(att.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        att = torch.softmax(att, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, timm: bool, talking: bool = False) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, timm, talking)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    """A plain ViT on 28x28 images: 7x7 patches, class token, 2 pre-norm blocks, a 10-class head."""

    def __init__(self, dim: int = 48, heads: int = 6, depth: int = 2, timm: bool = False,
                 talking: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, 7)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, timm, talking) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, image):
        x = self.patch(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def _hf(kind: str) -> nn.Module:
    common = dict(attn_implementation="eager")
    if kind.startswith("gpt2"):
        heads = 12 if kind == "gpt2-12" else 4
        cfg = transformers.GPT2Config(n_layer=2, n_embd=8 * heads if heads == 12 else 64, n_head=heads,
                                      vocab_size=128, n_positions=64, eos_token_id=0, bos_token_id=0, **common)
        return transformers.GPT2LMHeadModel(cfg)
    if kind.startswith("bert"):
        heads = 6 if kind == "bert6" else 4
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=16 * heads, num_attention_heads=heads,
                                      intermediate_size=128, vocab_size=128, max_position_embeddings=64, **common)
        return transformers.BertModel(cfg, add_pooling_layer=False)
    heads, kv = (9, 3) if kind == "llama93" else (6, 2)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=12 * heads, num_attention_heads=heads,
                                   num_key_value_heads=kv, intermediate_size=96, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=True, **common)
    return transformers.LlamaForCausalLM(cfg)


def export(kind: str, directory: Path, exporter: str = "torchscript") -> Path:
    """Export one small model (random weights, seeded) and return the ONNX path."""
    torch.manual_seed(0)
    path = Path(directory) / f"{kind}_{exporter}.onnx"
    if kind.startswith("vit"):
        model = ViT(timm=kind == "vit-timm", talking=kind == "vit-talking").eval()
        args, names = (torch.randn(2, 1, 28, 28),), ["image"]
        axes = {"image": {0: "batch"}}
    else:
        model = _Out(_hf(kind)).eval()
        args = (torch.randint(0, 128, (2, 7)), torch.ones(2, 7, dtype=torch.int64))
        names = ["input_ids", "attention_mask"]
        axes = {n: {0: "batch", 1: "seq"} for n in names}
    with torch.no_grad():  # exporters de-duplicate equal (e.g. zero) initializers; make them distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {}
            for n in names:
                dims[n] = {a: torch.export.Dim(s, min=1, max=64) for a, s in axes[n].items()}
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"], dynamo=True,
                              dynamic_shapes=dims, opset_version=18, external_data=True, verbose=False)
        else:
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"], dynamo=False,
                              opset_version=17, dynamic_axes={**axes, "out": {0: "batch"}})
    return path


def test_exports_load(tmp_path: Path) -> None:
    import edgesplit

    graph = edgesplit.load(export("vit", tmp_path))
    assert sum(layer.op_type == "Softmax" for layer in graph.layers) == 2
