"""Model registry: the built-in CNNs, `package.module:function` factories, and checkpoint loading."""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable

import torch
import torch.nn as nn

from .messages import shown


class ModelError(ValueError):
    """A model name, factory or checkpoint that cannot be used."""


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """Small CNN for the 8x8 scikit-learn digits (1 channel)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width),
            *_conv_bn(width, width),
            *_conv_bn(width, 2 * width, stride=2),
            *_conv_bn(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """The 3-stage CIFAR ResNet (He et al. 2016): depth = 6n + 2, widths 16/32/64."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"model: CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class CifarVGG(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs: 13 convs, one linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg: list = _VGG16):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn(cin, v)
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


_MOBILENET_V1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                 (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """MobileNet v1 (depthwise separable convs); `small_input` drops the stem stride (CIFAR port, 32x32)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 small_input: bool = True):
        super().__init__()
        width = lambda c: max(8, int(c * width_mult))  # noqa: E731
        cin = width(32)
        layers = _conv_bn(in_channels, cin, stride=1 if small_input else 2)
        for cout, stride in _MOBILENET_V1:
            cout = width(cout)
            layers += _conv_bn(cin, cin, stride=stride, groups=cin)  # depthwise
            layers += _conv_bn(cin, cout, kernel=1)  # pointwise
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
    "vgg16_bn": CifarVGG,
    "mobilenet_v1": lambda **kw: MobileNetV1(small_input=True, **kw),
    "mobilenet_v1_224": lambda **kw: MobileNetV1(small_input=False, **kw),
}


def _install_hint(module_name: str) -> str:
    """What to install when torchvision does not import (PyPI's wheel is built for the CUDA torch)."""
    if module_name.split(".")[0] != "torchvision":
        return ""
    minor = int(torch.__version__.split(".")[1])
    index = " --index-url https://download.pytorch.org/whl/cpu" if "+cpu" in torch.__version__ else ""
    return (f"; torchvision must be the build that matches torch {torch.__version__}: "
            f"pip install 'torchvision==0.{minor + 15}.*'{index}")


def resolve_factory(spec: str, field: str) -> Callable:
    """Import `package.module:function`; a clear ModelError naming `field` if it does not import."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"{field}: '{spec}' is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever a broken package raises while importing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{field}: cannot import module '{module_name}' ({reason}){_install_hint(module_name)}") \
            from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelError(f"{field}: '{module_name}' has no callable '{attr}'")
    return fn


def _accepts(fn: Callable, name: str) -> bool:
    """True if `fn` takes a keyword argument `name` (by name or through **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def check_model_name(name: str) -> None:
    """Raise ModelError unless `name` is a registered model or an importable factory."""
    if ":" in name:
        resolve_factory(name, "model.name")
    elif name not in REGISTRY:
        raise ModelError(f"model.name: unknown model '{name}'; allowed: {', '.join(REGISTRY)} or package.module:function")


def build_model(name: str, num_classes: int, in_channels: int = 3, kwargs: dict | None = None,
                checkpoint: str | None = None) -> nn.Module:
    """Build a registered model (or factory, given num_classes when it takes it) and load an optional checkpoint."""
    kwargs = dict(kwargs or {})
    if ":" in name:
        factory = resolve_factory(name, "model.name")
        if _accepts(factory, "num_classes"):
            kwargs.setdefault("num_classes", num_classes)
    else:
        check_model_name(name)
        factory = REGISTRY[name]
        kwargs.setdefault("num_classes", num_classes)
        kwargs.setdefault("in_channels", in_channels)
    try:
        model = factory(**kwargs)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.kwargs: building {name} with {shown(kwargs)} failed ({type(e).__name__}: {reason})") \
            from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.name: {name} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def read_weights(path: str, field: str):
    """torch.load(path, weights_only=True), or a one-line ModelError naming `field` (missing, a directory, corrupt,
    or carrying pickled code)."""
    if os.path.isdir(path):
        raise ModelError(f"{field}: {path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise ModelError(f"{field}: file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{field}: cannot read {path} as a weights-only state dict ({first})") from None


def read_state_dict(path: str, field: str = "model.checkpoint") -> dict:
    """The state dict in a checkpoint file (also inside {"state_dict": ...} or {"model": ...})."""
    obj = read_weights(path, field)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{field}: {path} does not hold a state dict of tensors")
    return obj


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state-dict checkpoint into `model`; ModelError if it does not match."""
    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise ModelError(f"model.checkpoint: {path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state)
