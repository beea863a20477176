"""Architectures built only for the tests: a torchvision-style bottleneck ResNet-50 and odd shapes."""
from __future__ import annotations

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's resnet50 layout: 7x7 stem, max-pool, [3, 4, 6, 3] bottlenecks, avg-pool, fc."""

    def __init__(self, num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = width, []
        for i, blocks in enumerate((3, 4, 6, 3)):
            w = width * 2 ** i
            layers = []
            for j in range(blocks):
                layers.append(Bottleneck(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w * 4
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """Factory used by the tests as `tests.archs:resnet50`."""
    return ResNet50(num_classes)


class FlattenCNN(nn.Module):
    """Conv features flattened straight into a hidden Linear layer (channel -> H*W features mapping)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.hidden = nn.Linear(12 * 4 * 4, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.flatten(self.features(x), 1))))


class NoBatchNorm(nn.Module):
    """A CNN without BatchNorm (adaptive BN has nothing to recalibrate)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm distinct, trained-looking parameters and statistics (no ties in rankings)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


class GroupNormCNN(nn.Module):
    """A CNN with a GroupNorm layer: the fast slicer does not handle it and defers to Torch-Pruning."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


# One small architecture per structure real models have that the channel-pruning model must get exactly right
# (or refuse): each mirrors what a torchvision or timm model does, at CIFAR size.

class GroupedSE(nn.Module):
    """ResNeXt/RegNet style: a grouped 3x3 conv (4 groups) between 1x1 convs, a squeeze-excitation, a residual."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32),
                                     nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1),
                                nn.Sigmoid())
        self.expand = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.grouped(self.reduce(x))
        y = self.expand(y * self.se(y))
        return self.fc(torch.relu(x + y).mean((2, 3)))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm subclass that holds its activation as a child module."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class BNActNet(nn.Module):
    """Convs followed by BatchNormAct layers, and a global pool called functionally in forward (MobileNetV2)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), BatchNormAct(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Ghost(nn.Module):
    """GhostNet's module: half the channels from a 1x1 conv, the other half a depthwise copy of them, concatenated."""

    def __init__(self, cin: int, cout: int, relu: bool = True):
        super().__init__()
        act = nn.ReLU() if relu else nn.Identity()
        self.primary = nn.Sequential(nn.Conv2d(cin, cout // 2, 1, bias=False), nn.BatchNorm2d(cout // 2), act)
        self.cheap = nn.Sequential(nn.Conv2d(cout // 2, cout // 2, 3, padding=1, groups=cout // 2, bias=False),
                                   nn.BatchNorm2d(cout // 2), act)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)


class GhostNetLike(nn.Module):
    """A ghost bottleneck: ghost (with ReLU) -> ghost (without) + a residual, as in GhostNet's blocks."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.ghost1, self.ghost2 = Ghost(16, 32), Ghost(32, 16, relu=False)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.ghost2(self.ghost1(x))
        return self.fc(x.mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute to channels-last, normalise, permute back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block: depthwise 7x7, channels-last LayerNorm and MLP, a layer-scale parameter, a residual."""

    def __init__(self, num_classes: int = 10, dim: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), LayerNorm2d(dim))
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head_norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.gamma * self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(self.head_norm(x.mean((2, 3))))


class TokenNet(nn.Module):
    """ViT style: patch embedding, a class token and a position embedding (bare parameters), an MLP block."""

    def __init__(self, num_classes: int = 10, dim: int = 16, patches: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x = x + self.mlp(self.norm1(x))
        return self.head(self.norm(x)[:, 0])


class ShuffleNetLike(nn.Module):
    """ShuffleNet's channel shuffle: a reshape of the channel dimension between two grouped convs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.shuffle_block = ShuffleUnit(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.shuffle_block(self.conv1(x)).mean((2, 3)))


class ShuffleUnit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, grouped 1x1 conv."""

    def __init__(self, channels: int, groups: int = 4):
        super().__init__()
        self.groups = groups
        self.a = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)
        self.b = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return torch.relu(self.b(x))


class MixConv(nn.Module):
    """MixNet's mixed depthwise conv: the channels split into fixed sizes, one kernel size per part."""

    def __init__(self, channels: int):
        super().__init__()
        self.splits = [channels // 2, channels - channels // 2]
        self.convs = nn.ModuleList([nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
                                    for c, k in zip(self.splits, (3, 5))])

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.splits, 1))], 1)


class MixNetLike(nn.Module):
    """`mixes` blocks of conv -> BN -> MixConv -> BN: each block's conv output is split with fixed sizes."""

    def __init__(self, num_classes: int = 10, mixes: int = 1):
        super().__init__()
        layers, cin = [], 3
        for _ in range(mixes):
            layers += [nn.Conv2d(cin, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), MixConv(16),
                       nn.BatchNorm2d(16), nn.ReLU()]
            cin = 16
        self.features = nn.Sequential(*layers, nn.Conv2d(cin, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def thousand_way(num_classes: int = 1000) -> nn.Module:
    """A factory that takes num_classes (as torchvision's do)."""
    return GroupedSE(num_classes)


def fixed_head() -> nn.Module:
    """A factory without num_classes: always a 1000-way classifier."""
    return GroupedSE(1000)


def shufflenet_like(num_classes: int = 10) -> nn.Module:
    """Factory for `prunetune run` tests: a model with a channel shuffle."""
    return ShuffleNetLike(num_classes)


def mixnet_like(num_classes: int = 10) -> nn.Module:
    """Factory for `prunetune run` tests: fixed-size channel splits in two layers."""
    return MixNetLike(num_classes, mixes=2)


class WindowNet(nn.Module):
    """Swin's window partition: the feature map reshaped into non-overlapping windows (a 6-d view)."""

    def __init__(self, num_classes: int = 10, window: int = 4):
        super().__init__()
        self.window = window
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.attend = WindowMix(16, window)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.attend(self.embed(x)).mean((2, 3)))


class WindowMix(nn.Module):
    """Mixes the channels of each window's pixels (a stand-in for window attention)."""

    def __init__(self, channels: int, window: int):
        super().__init__()
        self.window, self.mix = window, nn.Linear(channels, channels)

    def forward(self, x):
        b, c, h, w = x.shape
        s = self.window
        windows = x.permute(0, 2, 3, 1).reshape(b, h // s, s, w // s, s, c)
        return self.mix(windows).reshape(b, h, w, c).permute(0, 3, 1, 2)


def no_batchnorm(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Factory used by the tests as `tests.archs:no_batchnorm` (digits-sized input)."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


# Patterns from issue 28: channel permutations Torch-Pruning maps channel i to i through, constraints the graph does
# not show, and layers with nothing or something simple to slice.

PERMUTATIONS = {
    "roll": lambda x: torch.roll(x, 3, dims=1),
    "flip": lambda x: torch.flip(x, [1]),
    "index permutation": lambda x: x[:, torch.arange(x.shape[1] - 1, -1, -1)],
    "ChannelShuffle": nn.ChannelShuffle(4),
}


class Permuted(nn.Module):
    """c0 -> c1 -> a permutation of the channels -> c2, no BatchNorm and no bias (the issue's check)."""

    def __init__(self, permutation: str = "roll", num_classes: int = 10):
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, num_classes)
        permute = PERMUTATIONS[permutation]
        self.permute = permute if isinstance(permute, nn.Module) else None
        self.permute_fn = None if isinstance(permute, nn.Module) else permute

    def forward(self, x):
        x = self.c1(torch.relu(self.c0(x)))
        x = self.permute(x) if self.permute is not None else self.permute_fn(x)
        return self.fc(torch.relu(self.c2(torch.relu(x))).mean((2, 3)))


class FunctionalGroupNorm(nn.Module):
    """A parameter-free F.group_norm(x, 8) in forward after a conv: kept channels must be multiples of 8."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c0 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.c1 = nn.Conv2d(32, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(nn.functional.group_norm(self.c0(x), 8))
        return self.fc(torch.relu(self.c1(x)).mean((2, 3)))


class CompiledBlock(nn.Module):
    """A submodule wrapped in torch.compile (never called by the tests: the preflight refuses it first)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = torch.compile(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class UntraceableHead(nn.Module):
    """A layer whose forward refuses torch.jit tracing (what fvcore counts FLOPs with)."""

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("this layer cannot be traced")
        return x.mean((2, 3))


class NormActNet(nn.Module):
    """conv -> norm -> PReLU() (one shared slope) or an in-place ReLU, twice; `norm` is BatchNorm2d or an affine
    InstanceNorm2d (whose output, a view, an in-place ReLU used to hide from Torch-Pruning)."""

    def __init__(self, norm: str = "instance", act: str = "prelu", num_classes: int = 10, head: nn.Module = None):
        super().__init__()
        make_norm = {"batch": nn.BatchNorm2d, "instance": lambda c: nn.InstanceNorm2d(c, affine=True)}[norm]
        make_act = {"prelu": nn.PReLU, "relu": lambda: nn.ReLU(inplace=True)}[act]
        self.c0, self.n0, self.a0 = nn.Conv2d(3, 16, 3, padding=1), make_norm(16), make_act()
        self.c1, self.n1, self.a1 = nn.Conv2d(16, 32, 3, padding=1), make_norm(32), make_act()
        self.pool = head if head is not None else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.a1(self.n1(self.c1(self.a0(self.n0(self.c0(x))))))
        return self.fc(self.pool(x).flatten(1))


class PixelShuffleNet(nn.Module):
    """An upsampling PixelShuffle(2) between convs (channels become pixels)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.shuffle = nn.PixelShuffle(2)
        self.c2 = nn.Conv2d(4, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.shuffle(self.c1(torch.relu(self.c0(x))))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def compiled_block(num_classes: int = 10) -> nn.Module:
    """Factory for `prunetune run` tests: a torch.compile'd submodule."""
    return CompiledBlock(num_classes)


def rolled(num_classes: int = 10) -> nn.Module:
    """Factory for `prunetune` runs: channels rolled between two convs (Permuted('roll'))."""
    return Permuted("roll", num_classes)


# Issue 35: YOLO's blocks (Ultralytics' ultralytics/nn/modules/block.py and head.py, same ops, written here because
# ultralytics does not import beside the CPU torch): a conv's output chunked into two equal halves consumed differently.

class YoloConv(nn.Module):
    """Ultralytics' Conv: conv (no bias) -> BatchNorm -> SiLU, one SiLU module shared by every Conv (default_act)."""

    default_act = nn.SiLU()

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = self.default_act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class YoloBottleneck(nn.Module):
    """Ultralytics' Bottleneck: two Convs, a residual add when `shortcut` and the widths match."""

    def __init__(self, cin: int, cout: int, shortcut: bool = True, k: tuple[int, int] = (3, 3), e: float = 0.5):
        super().__init__()
        hidden = int(cout * e)
        self.cv1, self.cv2 = YoloConv(cin, hidden, k[0]), YoloConv(hidden, cout, k[1])
        self.add = shortcut and cin == cout

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: cv1's output chunked in two halves; one goes straight to the concat, the other through the
    bottlenecks (each output joins the concat too). With `split`, the halves are split by the size it holds
    (`split((self.c, self.c), 1)`, Ultralytics' forward_split)."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False, e: float = 0.5, split: bool = False):
        super().__init__()
        self.c, self.split = int(cout * e), split
        self.cv1 = YoloConv(cin, 2 * self.c, 1)
        self.cv2 = YoloConv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, self.c, shortcut, e=1.0) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1) if self.split else self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """YOLOv5's C3: two parallel 1x1 Convs, bottlenecks on one, concatenated into a third Conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        hidden = int(cout * e)
        self.cv1, self.cv2, self.cv3 = YoloConv(cin, hidden), YoloConv(cin, hidden), YoloConv(2 * hidden, cout)
        self.m = nn.Sequential(*(YoloBottleneck(hidden, hidden, shortcut, (1, 3), e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    """YOLO11's C3k: a C3 whose bottlenecks use k x k kernels."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True, e: float = 0.5, k: int = 3):
        super().__init__(cin, cout, n, shortcut, e)
        hidden = int(cout * e)
        self.m = nn.Sequential(*(YoloBottleneck(hidden, hidden, shortcut, (k, k), e=1.0) for _ in range(n)))


class C3k2(C2f):
    """YOLO11's C3k2: a C2f whose inner blocks are C3k blocks (c3k) or bottlenecks."""

    def __init__(self, cin: int, cout: int, n: int = 1, c3k: bool = False, e: float = 0.5, shortcut: bool = True):
        super().__init__(cin, cout, n, shortcut, e)
        self.m = nn.ModuleList(C3k(self.c, self.c, 2, shortcut) if c3k else YoloBottleneck(self.c, self.c, shortcut)
                               for _ in range(n))


class ProtoNet(nn.Module):
    """Ultralytics' Proto (YOLOv8-seg's mask prototypes): a Conv, a 2x upsampling ConvTranspose2d with a bias, two
    Convs; then a global pool and a classifier."""

    def __init__(self, num_classes: int = 10, c: int = 16):
        super().__init__()
        self.stem, self.cv1 = YoloConv(3, c, 3, 2), YoloConv(c, c, 3)
        self.upsample = nn.ConvTranspose2d(c, c, 2, 2, 0, bias=True)
        self.cv2, self.cv3 = YoloConv(c, c, 3), YoloConv(c, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.cv3(self.cv2(self.upsample(self.cv1(self.stem(x))))).mean((2, 3)))


class Attention(nn.Module):
    """Ultralytics' Attention (YOLO11's C2PSA): qkv by a 1x1 Conv, reshaped into heads and split into q, k and v of
    unequal sizes, attention over the pixels, plus a depthwise Conv of v, then a 1x1 projection."""

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.key_dim = self.head_dim // 2
        self.qkv = YoloConv(dim, dim + 2 * self.key_dim * heads)
        self.qkv.act = nn.Identity()
        self.proj, self.pe = YoloConv(dim, dim), YoloConv(dim, dim, 3, g=dim)
        self.proj.act, self.pe.act = nn.Identity(), nn.Identity()

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attention = (q.transpose(-2, -1) @ k * self.key_dim ** -0.5).softmax(dim=-1)
        x = (v @ attention.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(x)


class C2PSA(nn.Module):
    """YOLO11's C2PSA: cv1's output split in two halves by the size it holds (`split((self.c, self.c))`); one goes
    through a PSA block (attention and a feed-forward pair of Convs, each with a residual add), then both to cv2."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        self.c = channels // 2
        self.cv1, self.cv2 = YoloConv(channels, 2 * self.c), YoloConv(2 * self.c, channels)
        self.attn = Attention(self.c, heads)
        self.ffn = nn.Sequential(YoloConv(self.c, 2 * self.c), YoloConv(2 * self.c, self.c))
        self.ffn[1].act = nn.Identity()

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((a, b), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: a 1x1 Conv, three chained 5x5 max-pools, all four concatenated."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        hidden = cin // 2
        self.cv1, self.cv2 = YoloConv(cin, hidden), YoloConv(hidden * 4, cout)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: a softmax over reg_max bins, then a fixed 1x1 conv with arange weights."""

    def __init__(self, bins: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)
        self.bins = bins

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    """YOLOv8's Detect head: per scale a box branch (4 * reg_max) and a class branch, decoded through the DFL on
    anchor points. As Ultralytics' Detect: in training the raw prediction alone, in eval (decoded boxes and class
    scores, the raw prediction); the raw prediction is the per-scale maps [N, 4 * reg_max + nc, H, W] (`returns`
    "maps": Ultralytics 8.3 and before) or {"boxes": [N, 4 * reg_max, A], "scores": [N, nc, A], "feats": the
    head's inputs} ("dict": Ultralytics 8.4)."""

    def __init__(self, nc: int = 10, ch: tuple[int, ...] = (), reg_max: int = 8, strides: tuple[int, ...] = (),
                 returns: str = "maps"):
        super().__init__()
        self.nc, self.reg_max, self.no, self.strides, self.returns = nc, reg_max, nc + 4 * reg_max, strides, returns
        c2, c3 = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(YoloConv(c, c2, 3), YoloConv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(YoloConv(c, c3, 3), YoloConv(c3, c3, 3), nn.Conv2d(c3, nc, 1))
                                 for c in ch)
        self.dfl = DFL(reg_max)

    def forward(self, feats):
        x = [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(feats, self.cv2, self.cv3)]
        box, cls = torch.cat([f.view(len(f), self.no, -1) for f in x], 2).split((4 * self.reg_max, self.nc), 1)
        raw = {"boxes": box, "scores": cls, "feats": feats} if self.returns == "dict" else x
        if self.training:
            return raw
        anchors, strides = [], []
        for f, stride in zip(x, self.strides):
            h, w = f.shape[2:]
            sy, sx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), 0).view(2, -1))
            strides.append(torch.full((1, h * w), float(stride)))
        anchors, strides = torch.cat(anchors, 1), torch.cat(strides, 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        boxes = torch.cat(((anchors - lt + anchors + rb) / 2, rb + lt), 1) * strides
        return torch.cat((boxes, cls.sigmoid()), 1), raw


class YoloLike(nn.Module):
    """A small YOLOv8/11-shaped detector: a backbone of Convs and C2f / C3k2 / C3 blocks with SPPF, a PAN neck
    (upsample + concat, then strided Convs + concat) and a Detect head on three scales (strides 8, 16, 32)."""

    def __init__(self, nc: int = 10, w: int = 8, reg_max: int = 8, returns: str = "maps"):
        super().__init__()
        self.stem = nn.Sequential(YoloConv(3, w, 3, 2), YoloConv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w, 1, True))
        self.p3 = nn.Sequential(YoloConv(2 * w, 4 * w, 3, 2), C3k2(4 * w, 4 * w, 1, c3k=False, e=0.25))
        self.p4 = nn.Sequential(YoloConv(4 * w, 8 * w, 3, 2), C3(8 * w, 8 * w, 1))
        self.p5 = nn.Sequential(YoloConv(8 * w, 8 * w, 3, 2), C3k2(8 * w, 8 * w, 1, c3k=True), SPPF(8 * w, 8 * w))
        self.up4, self.up3 = nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=2)  # one module per call, as theirs
        self.top_down4 = C2f(16 * w, 8 * w, 1)
        self.top_down3 = C2f(12 * w, 4 * w, 1)
        self.down3, self.bottom_up4 = YoloConv(4 * w, 4 * w, 3, 2), C2f(12 * w, 8 * w, 1)
        self.down4, self.bottom_up5 = YoloConv(8 * w, 8 * w, 3, 2), C3k2(16 * w, 8 * w, 1, c3k=True)
        self.detect = Detect(nc, (4 * w, 8 * w, 8 * w), reg_max, (8, 16, 32), returns)

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.top_down4(torch.cat((self.up4(p5), p4), 1))
        n3 = self.top_down3(torch.cat((self.up3(n4), p3), 1))
        n4 = self.bottom_up4(torch.cat((self.down3(n3), n4), 1))
        n5 = self.bottom_up5(torch.cat((self.down4(n4), p5), 1))
        return self.detect([n3, n4, n5])


def yolo_like(num_classes: int = 2, returns: str = "maps") -> nn.Module:
    """YoloLike with Ultralytics' reg_max of 16 (what model.task yolo decodes), as a model factory."""
    return YoloLike(num_classes, reg_max=16, returns=returns)


class FixedSplit(nn.Module):
    """conv -> its channels split by `how` (a chunk into unequal parts, or split by sizes, equal or not: sizes written
    in the code, which pruning cannot follow) -> the first part straight to a concat, the rest through a conv."""

    SPLITS = {"chunk into 3": lambda x: x.chunk(3, 1), "split [4, 12]": lambda x: x.split([4, 12], 1),
              "split (8, 8)": lambda x: x.split((8, 8), 1)}

    def __init__(self, cin: int, how: str):
        super().__init__()
        self.how = how
        self.cv1 = YoloConv(cin, 16)
        rest = 16 - 6 if how == "chunk into 3" else 16 - {"split [4, 12]": 4, "split (8, 8)": 8}[how]
        self.m = YoloConv(rest, rest, 3)
        self.cv2 = YoloConv(16 + rest, cin)

    def forward(self, x):
        first, *rest = self.SPLITS[self.how](self.cv1(x))
        rest = torch.cat(rest, 1)
        return self.cv2(torch.cat((first, rest, self.m(rest)), 1))


class BlockNet(nn.Module):
    """A stem conv, `blocks` (YOLO blocks or FixedSplit) in a row, a global pool and a classifier."""

    def __init__(self, *blocks: nn.Module, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = YoloConv(3, width, 3, 2)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class ChunkedConcat(nn.Module):
    """Two convs concatenated, then chunked in two: each half is one conv's channels, so neither conv can be pruned
    (the chunk would split elsewhere than where their channels meet)."""

    def __init__(self, cin: int):
        super().__init__()
        self.a, self.b = YoloConv(cin, 8), YoloConv(cin, 8)
        self.m = YoloConv(8, 8, 3)
        self.cv2 = YoloConv(16, cin)

    def forward(self, x):
        first, second = torch.cat((self.a(x), self.b(x)), 1).chunk(2, 1)
        return self.cv2(torch.cat((first, self.m(second)), 1))
