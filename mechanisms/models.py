"""Model zoo: architectures sized from a dataset's input shape and class count.

Every model is built by a factory ``factory(input_shape, num_classes) -> nn.Module``.
Normalisation is GroupNorm, never BatchNorm (BatchNorm mixes examples of a batch, which
breaks per-example gradients and DP-SGD's sensitivity bound).

Residual networks expose a :class:`PerturbationSlot` in every residual block: the module
that joins the shortcut and the residual branch. By default it is the plain sum
``shortcut + branch``; the residual-perturbation mechanism swaps in a noisy version.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "BasicBlock",
    "MaxPool2d",
    "PerturbationSlot",
    "build_model",
    "model_names",
    "residual_blocks",
]

ModelFactory = Callable[[Sequence[int], int], nn.Module]


class PerturbationSlot(nn.Module):
    """Joins a residual block's shortcut and branch: ``shortcut + branch`` (no noise)."""

    def forward(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return shortcut + branch


class BasicBlock(nn.Module):
    """CIFAR-style basic block: two 3x3 convolutions with GroupNorm, ReLU after the join."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.GroupNorm(_groups(c_out), c_out),
            )
        self.perturb: nn.Module = PerturbationSlot()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return torch.relu(self.perturb(self.shortcut(x), branch))


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` computed on a channels-last copy of its input; same values, faster.

    On CPU, torch's max pooling of a contiguous NCHW tensor is several times slower than on
    channels-last memory: for the cnn's 2x2/1 pooling of [256, 16, 13, 13] we measured 6.5 ms
    against 0.9 ms (2 threads, torch 2.14), which made pooling most of a training step. The
    output stays channels-last; every later layer accepts that. Inside ``torch.func``
    transforms (which cannot change memory format) it falls back to plain pooling.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.device.type == "cpu":
            try:
                x = x.contiguous(memory_format=torch.channels_last)
            except RuntimeError:  # functorch (vmap) tensors keep their layout
                pass
        return super().forward(x)


def _groups(channels: int) -> int:
    # 8 groups (or fewer for narrow layers): the GroupNorm setting common in DP training.
    return min(8, channels)


class ResNet(nn.Module):
    """ResNet for small images (He et al. 2016, CIFAR variant): 3 stages of ``n`` blocks."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(16), 16),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        c_in = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(c_in, width, stride))
                c_in = width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {model!r} needs image inputs [channels, height, width], got input shape "
            f"{tuple(input_shape)}; use 'mlp' for tabular data"
        )
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def mlp(input_shape: Sequence[int], num_classes: int, hidden: int = 256) -> nn.Module:
    """Flatten, one hidden ReLU layer of ``hidden`` units, linear output."""
    d = 1
    for s in input_shape:
        d *= int(s)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The tanh CNN of the DP-SGD literature (Papernot et al. 2021, "tempered sigmoid").

    conv16 8x8/2 pad 2 -> tanh -> maxpool 2/1 -> conv32 4x4/2 -> tanh -> maxpool 2/1 ->
    fc32 -> tanh -> fc. On 28x28 inputs the flattened feature size is 512, on 32x32 it is 800.
    """
    c, h, w = _image_shape(input_shape, "cnn")
    features = nn.Sequential(
        nn.Conv2d(c, 16, 8, stride=2, padding=2),
        nn.Tanh(),
        MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.Tanh(),
        MaxPool2d(2, 1),
        nn.Flatten(),
    )
    try:
        with torch.no_grad():
            flat = features(torch.zeros(1, c, h, w)).shape[1]
    except RuntimeError as err:
        raise ValueError(
            f"model 'cnn' needs images of at least 16x16 pixels, got {h}x{w}; use 'mlp' or "
            "'resnet8' for smaller images"
        ) from err
    return nn.Sequential(features, nn.Linear(flat, 32), nn.Tanh(), nn.Linear(32, num_classes))


def resnet8(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """ResNet-8: 3 stages x 1 basic block, GroupNorm, one perturbation slot per block."""
    c, _, _ = _image_shape(input_shape, "resnet8")
    return ResNet(c, num_classes, blocks_per_stage=1)


def resnet20(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """ResNet-20: 3 stages x 3 basic blocks, GroupNorm, one perturbation slot per block."""
    c, _, _ = _image_shape(input_shape, "resnet20")
    return ResNet(c, num_classes, blocks_per_stage=3)


MODELS: dict[str, ModelFactory] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet8": resnet8,
    "resnet20": resnet20,
}


def model_names() -> list[str]:
    return sorted(MODELS)


def import_callable(spec: Any, what: str, part: str = "function") -> Callable[..., Any]:
    """The callable a user named as ``package.module:<part>`` (imported only because they did);
    errors name the ``what`` (a model, a trainer) and the spec."""
    module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr:
        raise ValueError(f"a user {what} is given as 'package.module:{part}', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for {what} {spec!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no callable {attr!r} ({what} {spec!r})")
    return fn


def _user_factory(spec: str) -> ModelFactory:
    return import_callable(spec, "model", "factory")


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, seed: int | None = None
) -> nn.Module:
    """Build model ``name`` (a registry name or ``package.module:factory``).

    A user factory is called as ``factory(input_shape=..., num_classes=...)`` and must return
    an ``nn.Module``. With ``seed`` the initial weights are reproducible; the global torch RNG
    is left exactly as it was (``fork_rng``).
    """
    if ":" in name:
        factory = _user_factory(name)
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(model_names())}, or 'package.module:factory'"
        )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = factory(input_shape=tuple(input_shape), num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not nn.Module")
    return model


def residual_blocks(model: nn.Module) -> list[BasicBlock]:
    """The residual blocks of ``model`` that carry a perturbation slot, in forward order."""
    return [m for m in model.modules() if isinstance(m, BasicBlock)]
