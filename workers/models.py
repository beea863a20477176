"""Model registry: the built-in CNNs, `package.module:function` factories, and checkpoint loading."""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .errors import BadInput
from .messages import shown


class ModelError(BadInput, ValueError):
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
        raise ModelError(f"model.name: unknown model '{name}'; allowed: {', '.join(REGISTRY)} or "
                         "package.module:function")


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


def _first_line(e: Exception) -> str:
    """An exception's first line, without the terminal colour codes torch puts in its messages."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _is_safetensors(path: str) -> bool:
    """True if `path` is named .safetensors or starts as one does (an 8-byte header length, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    return path.endswith(".safetensors") or (
        len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path))


def _read_safetensors(path: str, field: str) -> dict:
    """The tensors of a safetensors file (the optional safetensors package reads it, without pickle)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelError(f"{field}: {path} is a safetensors file; reading it needs the safetensors package "
                         "(pip install 'prunetune[safetensors]')") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise ModelError(f"{field}: cannot read {path} as a safetensors file ({_first_line(e)})") from None


def _pickled_globals(path: str, pickles: int = 4) -> list[str]:
    """The globals (module.name) that the first pickles of a file name, read without running them (a legacy,
    non-zip torch.save file is a few pickles in a row: magic number, protocol, system info, the object); those of
    tensors and state dicts (torch's own outside torch.nn, OrderedDict) left out. [] where the file holds no pickle."""
    found = []
    with open(path, "rb") as f:
        for _ in range(pickles):
            strings: list[str] = []
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL" and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(".".join(strings[-2:]))
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # the end of the pickles, or no pickle
                break
    def plain(n: str) -> bool:
        return (n.startswith("torch.") and not n.startswith("torch.nn.")) or n == "collections.OrderedDict"

    return [n for n in dict.fromkeys(found) if not plain(n)]


def _why_refused(path: str, e: Exception) -> str:
    """Why torch's weights-only loading refused `path`, in one line: a whole pickled model, pickled code, or
    torch's own first line (never its advice to load with weights_only=False, which runs the file's code)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else \
            _pickled_globals(path)
    except Exception:  # a damaged zip, or a torch without the function
        names = []
    names = [n for n in names if n not in _SAFE_NAMES]
    if any(n.startswith("torch.nn.modules.") for n in names):
        model_class = next((n for n in names if not n.startswith("torch.")), names[0])
        return (f"{path} holds a whole pickled model ({model_class}), not a state dict; save the weights with "
                "torch.save(model.state_dict(), path) and give that file")
    if names:
        return (f"cannot read {path} as a weights-only state dict (it holds pickled objects of "
                f"{', '.join(names[:3])}, which weights-only loading does not run)")
    reason = _first_line(e)
    if "weights_only" in reason:
        reason = "torch's weights-only loading refused it: a pickle of other objects than tensors, or a damaged file"
    return f"cannot read {path} as a weights-only state dict ({reason})"


_SAFE_GLOBALS = (argparse.Namespace,)  # harmless objects training scripts save beside the weights ("args")
_SAFE_NAMES = {f"{c.__module__}.{c.__qualname__}" for c in _SAFE_GLOBALS}


def read_weights(path: str, field: str):
    """What a weights file holds: torch.load(path, weights_only=True), or a safetensors file's tensors; a one-line
    ModelError naming `field` otherwise (missing, a directory, corrupt, a whole pickled model, pickled code)."""
    if os.path.isdir(path):
        raise ModelError(f"{field}: {path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise ModelError(f"{field}: file not found: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path, field)
    try:
        with torch.serialization.safe_globals(list(_SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # a plain pickle: refused in one line below
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals
        raise ModelError(f"{field}: {_why_refused(path, e)}") from None


def read_state_dict(path: str, field: str = "model.checkpoint") -> dict:
    """The state dict of tensors a file holds as a whole (a file prunetune wrote, or any plain state dict)."""
    obj = read_weights(path, field)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{field}: {path} does not hold a state dict of tensors")
    return obj


def nonfinite(state: dict) -> list[str]:
    """The names of the floating-point tensors in `state` holding NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


@dataclass(frozen=True)
class _Mapping:
    """A way to read a model's state dict out of a checkpoint: a nested entry, and a key prefix removed."""

    entry: tuple[str, ...]  # the keys leading to the dict of tensors: () for the file's top level
    prefix: str  # what every key of the model's tensors starts with there ('' for none; 'model.', '_orig_mod.')
    tensors: dict  # the entry's tensors, all of them

    @property
    def name(self) -> str:
        """What model.checkpoint_key calls it: the entry and prefix joined with dots ('.' for the top level)."""
        return ".".join([*self.entry, *([self.prefix[:-1]] if self.prefix else [])]) or "."

    def state(self) -> dict:
        """The tensors under the prefix, named as the model names them."""
        n = len(self.prefix)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(self.prefix)}


def _optional(key: str) -> bool:
    """A buffer a checkpoint may lack: BatchNorm's step counter (the model keeps its own, as torch's loader does
    for a state dict without version metadata)."""
    return key.rsplit(".", 1)[-1] == "num_batches_tracked"


def _tensor_dicts(obj, entry: tuple[str, ...] = (), depth: int = 3):
    """(entry, {name: tensor}) for every dict holding tensors in `obj`, nested up to `depth` dicts deep."""
    if not isinstance(obj, dict):
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        yield entry, tensors
    if depth:
        for k, v in obj.items():
            yield from _tensor_dicts(v, (*entry, str(k)), depth - 1)


def _mappings(obj, own: dict) -> list[_Mapping]:
    """Every (entry, prefix) of `obj` under which at least one of the model's tensor names appears."""
    found = []
    for entry, tensors in _tensor_dicts(obj):
        prefixes = {k[:i] for k in tensors for i in (0, *(j + 1 for j, c in enumerate(k) if c == "."))
                    if k[i:] in own}
        found += [_Mapping(entry, p, tensors) for p in sorted(prefixes or {""})]
    return found


def _mismatch(state: dict, own: dict) -> str:
    """How `state` differs from the model's `own` state dict ('' if it fits)."""
    missing = [k for k in own if k not in state and not _optional(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
    return "; ".join(parts)


def _fits(mapping: _Mapping, own: dict) -> bool:
    """Every tensor of the model is there, with its shape (entries the model does not have are ignored)."""
    state = mapping.state()
    return not _mismatch({k: v for k, v in state.items() if k in own}, own)


def load_checkpoint(model: nn.Module, path: str, key: str | None = None) -> str:
    """Load the state dict a checkpoint holds for `model`: the file's top level or the one nested entry
    ('state_dict', 'model', ...) that fits, with one common key prefix removed ('module.', '_orig_mod.',
    Lightning's 'model.'); `key` (model.checkpoint_key) chooses when several fit. Returns what was done beyond a
    plain load, in words ('' for none); ModelError (one line) when nothing fits, several do, or a weight is NaN/inf."""
    own = model.state_dict()
    mappings = _mappings(read_weights(path, "model.checkpoint"), own)
    if not mappings:
        raise ModelError(f"model.checkpoint: {path} does not hold a state dict of tensors")
    if key is not None:
        chosen = [m for m in mappings if m.name == key]
        if not chosen:
            fit = sorted({m.name for m in mappings if _fits(m, own)})
            names = ", ".join(f"'{n}'" for n in fit or sorted({m.name for m in mappings}))
            found = f"those that fit the model: {names}" if fit else f"it has {names}, none fits the model"
            raise ModelError(f"model.checkpoint_key: {path} has no state dict '{key}'; {found}")
        mappings = chosen
    fitting = [m for m in mappings if _fits(m, own)]
    if len(fitting) > 1:
        names = ", ".join(f"'{m.name}'" + (" (the top level)" if m.name == "." else "") for m in fitting)
        raise ModelError(f"model.checkpoint: {path} holds {len(fitting)} state dicts that fit the model ({names}); "
                         f"choose one with model.checkpoint_key (e.g. --set model.checkpoint_key={fitting[-1].name})")
    if not fitting:
        closest = max(mappings, key=lambda m: sum(k in own for k in m.state()))
        where = f" ('{closest.name}')" if closest.name != "." else ""
        raise ModelError(f"model.checkpoint: {path}{where} does not match the model: "
                         + _mismatch(closest.state(), own))
    mapping = fitting[0]
    state = {k: v for k, v in mapping.state().items() if k in own}
    bad = nonfinite(state)
    if bad:
        raise ModelError(f"model.checkpoint: {path} has non-finite weights (NaN or inf in {len(bad)} of its tensors, "
                         f"e.g. {bad[0]}); give the weights of a model that trained without diverging")
    absent = [k for k in own if k not in state]  # only num_batches_tracked buffers: _fits checked the rest
    model.load_state_dict({**{k: own[k] for k in absent}, **state})
    done = [f"loaded '{'.'.join(mapping.entry)}' from {path}" if mapping.entry else f"loaded {path}"]
    if mapping.prefix:
        done.append(f"prefix '{mapping.prefix}' removed")
    ignored = len(mapping.tensors) - len(state)
    if ignored:
        done.append(f"the other {ignored} tensors in it ignored")
    if absent:
        done.append(f"{len(absent)} absent num_batches_tracked buffers kept as built")
    return ", ".join(done) if mapping.entry or len(done) > 1 else ""
