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
            layers += [nn.Conv2d(cin, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), MixConv(16), nn.BatchNorm2d(16),
                       nn.ReLU()]
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
