"""CAMPPlus speaker encoder: time-centred Kaldi fbank → 192-d style vector for the s2mel DiT.

Ports indextts/s2mel/modules/campplus/DTDNN.py (`CAMPPlus`, `FCM`) and layers.py
(`BasicResBlock`, `TDNNLayer`, `CAMDenseTDNNBlock`, `CAMLayer`, `TransitLayer`, `DenseLayer`,
`StatsPool`), inference only (BatchNorm uses running statistics). Keys are those of
`campplus.safetensors` (3D-Speaker `campplus_cn_common.bin`). The official constructor hard-codes
growth_rate / bn_size / init_channels / embedding_size, so every width is read from the
checkpoint's tensor shapes instead.
Shapes: B batch, T fbank frames (100 Hz), T' = ceil(T/2) after the strided TDNN, Fq frequency
rows of the 2-D head, C channels."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .weights import load_module, read_shapes

FEAT_DIM = 80                      # CAMPPlus(feat_dim=80) in infer_v2: kaldi fbank bins
HEAD_FREQ_REDUCTION = 8            # FCM: two strided res layers and conv2, each halving frequency
TDNN_KERNEL = 5                    # xvector.tdnn: Conv1d k5, stride 2
TDNN_STRIDE = 2
BLOCK_DILATIONS = (1, 2, 2)        # CAMDenseTDNNBlock dilations, hard-coded upstream (not in shapes)
CAM_SEGMENT_FRAMES = 100           # CAMLayer.seg_pooling seg_len
BN_EPS = 1e-5


@dataclass(frozen=True, kw_only=True, slots=True)
class CAMPPlusConfig:
    m_channels: int                # FCM width: head.conv1.weight (m, 1, 3, 3)
    head_blocks: tuple[int, int]   # BasicResBlocks in head.layer1 / head.layer2
    init_channels: int             # xvector.tdnn.linear.weight (init, m·Fq/8, 5)
    growth_rate: int               # cam_layer.linear_local.weight (growth, bn, 3)
    bn_channels: int               # bn_size · growth_rate: tdnnd.linear1.weight (bn, C_in, 1)
    cam_channels: int              # bn_channels // reduction: cam_layer.linear1.weight (cam, bn, 1)
    block_layers: tuple[int, ...]  # CAMDenseTDNN layers per block (12, 24, 16 upstream)
    embedding_size: int            # xvector.dense.linear.weight (emb, 2·C, 1)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> CAMPPlusConfig:
        """Derive every width from `weights.read_shapes(campplus.safetensors)`."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ConfigError(f"campplus checkpoint lacks {key}: cannot derive its dimensions")
            return shapes[key]

        def count(pattern: str) -> int:
            rx = re.compile(pattern)
            return len({m.group(1) for k in shapes if (m := rx.match(k))})

        n_blocks = count(r"xvector\.block(\d+)\.")
        if n_blocks != len(BLOCK_DILATIONS):
            want = len(BLOCK_DILATIONS)
            raise ConfigError(f"campplus checkpoint has {n_blocks} dense blocks, expected {want}")
        first = "xvector.block1.tdnnd1."
        return cls(
            m_channels=shape("head.conv1.weight")[0],
            head_blocks=(count(r"head\.layer1\.(\d+)\."), count(r"head\.layer2\.(\d+)\.")),
            init_channels=shape("xvector.tdnn.linear.weight")[0],
            growth_rate=shape(first + "cam_layer.linear_local.weight")[0],
            bn_channels=shape(first + "linear1.weight")[0],
            cam_channels=shape(first + "cam_layer.linear1.weight")[0],
            block_layers=tuple(count(rf"xvector\.block{b}\.tdnnd(\d+)\.") for b in range(1, n_blocks + 1)),
            embedding_size=shape("xvector.dense.linear.weight")[0],
        )


def _bn_relu(channels: int) -> nn.Sequential:
    """upstream get_nonlinear("batchnorm-relu"): keys `<name>.batchnorm.*`."""
    return nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(channels, eps=BN_EPS), relu=nn.ReLU()))


class BasicResBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                nn.BatchNorm2d(planes, eps=BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:  # [B, C, Fq, T] -> [B, C, Fq/stride, T]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FCM(nn.Module):
    """2-D residual head: strides only along frequency, then frequency folded into channels."""

    def __init__(self, cfg: CAMPPlusConfig) -> None:
        super().__init__()
        m = cfg.m_channels
        self.conv1 = nn.Conv2d(1, m, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m, eps=BN_EPS)
        # The first block of each layer strides 2 along frequency, the rest stride 1.
        self.layer1 = nn.Sequential(*(BasicResBlock(m, m, 1 if i else 2) for i in range(cfg.head_blocks[0])))
        self.layer2 = nn.Sequential(*(BasicResBlock(m, m, 1 if i else 2) for i in range(cfg.head_blocks[1])))
        self.conv2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:  # [B, Fq, T] -> [B, m·Fq/8, T]
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))  # [B, m, Fq, T]
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))  # [B, m, Fq/8, T]
        b, c, f, t = out.shape
        return out.reshape(b, c * f, t)


class TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(
            in_channels, out_channels, TDNN_KERNEL, stride=TDNN_STRIDE, padding=TDNN_KERNEL // 2, bias=False
        )
        self.nonlinear = _bn_relu(out_channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, T] -> [B, C, T']
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Context-aware masking: a local conv gated by utterance mean + 100-frame segment means."""

    def __init__(self, cfg: CAMPPlusConfig, dilation: int) -> None:
        super().__init__()
        bn, k = cfg.bn_channels, 3
        pad = (k - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(bn, cfg.growth_rate, k, padding=pad, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn, cfg.cam_channels, 1)
        self.linear2 = nn.Conv1d(cfg.cam_channels, cfg.growth_rate, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, bn, T'] -> [B, growth, T']
        y = self.linear_local(x)
        t = x.shape[-1]
        # ceil_mode: the last partial segment averages only its real frames (no padding counted).
        seg = F.avg_pool1d(x, CAM_SEGMENT_FRAMES, CAM_SEGMENT_FRAMES, ceil_mode=True)  # [B, bn, ceil(T'/100)]
        seg = seg.repeat_interleave(CAM_SEGMENT_FRAMES, dim=-1)[..., :t]  # back to one value per frame
        context = x.mean(-1, keepdim=True) + seg
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return y * gate


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, cfg: CAMPPlusConfig, in_channels: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, cfg.bn_channels, 1, bias=False)
        self.nonlinear2 = _bn_relu(cfg.bn_channels)
        self.cam_layer = CAMLayer(cfg, dilation)

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, T'] -> [B, growth, T']
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.Module):
    """Dense block: every layer's output is concatenated to its input (keys tdnnd1, tdnnd2, ...)."""

    def __init__(self, cfg: CAMPPlusConfig, num_layers: int, in_channels: int, dilation: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        for i in range(num_layers):
            layer = CAMDenseTDNNLayer(cfg, in_channels + i * cfg.growth_rate, dilation)
            self.add_module(f"tdnnd{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, T'] -> [B, C_in + n·growth, T']
        for layer in self.children():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:  # [B, C, T'] -> [B, 2C]: mean and unbiased std over time
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, correction=1)], dim=-1)


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        # upstream get_nonlinear("batchnorm_"): non-affine BN, keys running_mean / running_var only
        bn = nn.BatchNorm1d(out_channels, eps=BN_EPS, affine=False)
        self.nonlinear = nn.Sequential(OrderedDict(batchnorm=bn))

    def forward(self, x: Tensor) -> Tensor:  # [B, C] -> [B, emb]
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """(B, T, 80) time-centred fbank → (B, embedding_size) speaker style, no L2 normalisation."""

    def __init__(self, cfg: CAMPPlusConfig) -> None:
        super().__init__()
        self.head = FCM(cfg)
        xvector: OrderedDict[str, nn.Module] = OrderedDict()
        xvector["tdnn"] = TDNNLayer(cfg.m_channels * (FEAT_DIM // HEAD_FREQ_REDUCTION), cfg.init_channels)
        channels = cfg.init_channels
        for i, (num_layers, dilation) in enumerate(zip(cfg.block_layers, BLOCK_DILATIONS, strict=True)):
            xvector[f"block{i + 1}"] = CAMDenseTDNNBlock(cfg, num_layers, channels, dilation)
            channels += num_layers * cfg.growth_rate
            xvector[f"transit{i + 1}"] = TransitLayer(channels, channels // 2)
            channels //= 2
        xvector["out_nonlinear"] = _bn_relu(channels)
        xvector["stats"] = StatsPool()
        xvector["dense"] = DenseLayer(2 * channels, cfg.embedding_size)
        self.xvector = nn.Sequential(xvector)

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank (B, T, 80) float32, already minus its time mean → style (B, embedding_size)."""
        return self.xvector(self.head(fbank.permute(0, 2, 1)))  # head input [B, 80, T]


def load_campplus(ckpt_dir: Path, device: torch.device | str) -> CAMPPlus:
    """CAMPPlus from campplus.safetensors, dimensions read from its tensor shapes."""
    path = Path(ckpt_dir) / "campplus.safetensors"
    cfg = CAMPPlusConfig.from_shapes(read_shapes(path))
    return load_module(lambda: CAMPPlus(cfg), path, device)
