"""Small CNNs with the DAG shapes real CNNs have, built with torch and exported to ONNX (dev/test only).

resnet: residual adds; densenet: dense concatenation; vgg: plain chain; mobilenet: depthwise and grouped
convolutions; inception: branches that fan out and merge. All include BatchNorm, pooling, Flatten, Gemm, Softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgesplit.cluster import Cluster
from edgesplit.layout import ReplicaMode


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU()]


class _Head(nn.Module):
    def __init__(self, c: int, classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(torch.flatten(self.pool(x), 1)), dim=1)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32), blocks=(1, 1, 1), classes: int = 10, stem_pool: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), *_bn_relu(widths[0])]
        if stem_pool:
            layers.append(nn.MaxPool2d(3, 2, 1))
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.body = nn.Sequential(*layers)
        self.head = _Head(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.f = nn.Sequential(*_bn_relu(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                               *_bn_relu(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.f(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, blocks=(2, 2), stem: int = 16, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, 1, 1, bias=False)]
        c = stem
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                layers += [*_bn_relu(c), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
                c //= 2
        layers += _bn_relu(c)
        self.body = nn.Sequential(*layers)
        self.head = _Head(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class VGG(nn.Module):
    def __init__(self, cfg=(8, "M", 16, 16, "M", 32), classes: int = 10, spatial_after: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, 1, 1), *_bn_relu(int(v))]
                c = int(v)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(spatial_after)
        self.fc = nn.Sequential(nn.Linear(c * spatial_after**2, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(torch.flatten(self.pool(self.body(x)), 1)), dim=1)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.f = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, groups=2 if cin % 2 == 0 and cout % 2 == 0 else 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x) if self.use_res else self.f(x)


class MobileNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
            InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1),
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
        )
        self.head = _Head(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 5, 1, 2), nn.ReLU())
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, c, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  InceptionBlock(16, 8), InceptionBlock(32, 8))
        self.head = _Head(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def resnet18(classes: int = 1000) -> nn.Module:
    """ResNet-18 (11.7 M parameters at 1000 classes), written out so that torchvision is not needed."""
    return ResNet(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=classes)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet": (lambda: ResNet(), (1, 3, 32, 32)),
    "densenet": (lambda: DenseNet(), (1, 3, 16, 16)),
    "vgg": (lambda: VGG(), (1, 3, 16, 16)),
    "mobilenet": (lambda: MobileNet(), (1, 3, 32, 32)),
    "inception": (lambda: Inception(), (1, 3, 16, 16)),
}


def export(model: nn.Module, shape: tuple[int, ...], path: str | Path, seed: int = 0, dynamic_batch: bool = True,
           keep_batchnorm: bool = True) -> Path:
    """Randomise BatchNorm statistics (so they matter), then export with the TorchScript exporter.

    keep_batchnorm exports in training-preserving mode so BatchNorm nodes stay in the graph as layers.
    """
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    path = Path(path)
    args = (torch.randn(*shape),)
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(
        model, args, str(path), dynamo=False, opset_version=17, input_names=["input"], output_names=["output"],
        do_constant_folding=not keep_batchnorm,
        training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL,
        **kwargs,
    )
    return path


def build(name: str, directory: str | Path, **kw) -> Path:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    return export(factory(), shape, Path(directory) / f"{name}.onnx", **kw)


def split_conv(channels: int = 4, size: int = 8, batch: int | str = "batch", seed: int = 0,
               zero_units: tuple[int, ...] = ()) -> onnx.ModelProto:
    """x -> stem Conv/Relu -> conv1 (2 x `channels` outputs) -> conv2 (`channels` outputs) -> Relu/GAP/Flatten/Gemm
    -> y, plain ONNX for failure tests: conv1 is split by output channels, conv2 by input channels.
    `zero_units` zeroes those output channels of conv1 (weights and bias): what a plan that lost exactly those
    channels must answer."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3  # noqa: E731
    stem, wide = 2 * channels, 2 * channels
    w1, b1 = w(wide, stem, 3, 3), w(wide)
    w1[list(zero_units)], b1[list(zero_units)] = 0.0, 0.0
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w(stem, 3, 3, 3), "w0"), (w(stem), "b0"), (w1, "w1"), (b1, "b1"), (w(channels, wide, 3, 3), "w2"),
        (w(channels), "b2"), (w(10, channels), "wf"), (w(10), "bf")]]
    conv = dict(pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["h0"], name="stem_conv", **conv),
        helper.make_node("Relu", ["h0"], ["h"], name="stem_relu"),
        helper.make_node("Conv", ["h", "w1", "b1"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "split_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def replicated_split_conv(parts: tuple[str, str], replica: str, rest: Mapping[str, str], combine: str,
                          cluster: Cluster, mode: ReplicaMode = ReplicaMode.STANDBY, **model: Any) -> tuple:
    """`split_conv` with conv1 split by output channels over `parts` and all of part 0's units replicated on
    `replica`, built through the API: (plan, unsplit graph). `rest` places the other layers, `combine` the Concat."""
    from edgesplit.graph import load
    from edgesplit.place.parts import place
    from edgesplit.planner import plan, with_replicas
    from edgesplit.rewrite import cnn
    from edgesplit.rewrite.base import SplitRequest
    from edgesplit.rewrite.replicas import ReplicaRequest

    graph = load(split_conv(**model))
    split = cnn.apply(graph, [SplitRequest("lop", ("conv1",), len(parts))])
    combines = dict.fromkeys((n for r in split.regions for n in r.combine_nodes), combine)
    split, where = place(split, cluster, {"lop:conv1": parts}, {**rest, **combines})
    region = split.regions[0]
    split, where = with_replicas(split, where, [ReplicaRequest(region.name, 0, region.parts[0].units, replica, mode)])
    return plan(split, cluster, where), graph
