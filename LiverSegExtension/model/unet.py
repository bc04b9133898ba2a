"""MONAI's residual UNet (``monai.networks.nets.UNet``), module for module, without importing MONAI.

Importing MONAI loads every one of its submodules (about 3 s on a 2-core CPU, more than segmenting a CT
takes), so the engine builds the same network from torch alone: the same layers under the same names,
so weights load into either and give the same output (``Testing/test_model.py`` checks both against
MONAI's own class). Covered: MONAI's defaults as LiverSeg uses them (3D, PReLU, instance norm without
affine, dropout 0, kernel 3, norm-dropout-activation order), any channels, strides and ``num_res_units``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


def _adn(channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(N=nn.InstanceNorm3d(channels), D=nn.Dropout(0.0), A=nn.PReLU()))


class Convolution(nn.Sequential):
    """``monai.networks.blocks.Convolution``: a (transposed) convolution, then norm, dropout, activation."""

    def __init__(self, cin: int, cout: int, stride: int, transposed: bool = False, conv_only: bool = False) -> None:
        super().__init__()
        if transposed:
            self.add_module("conv", nn.ConvTranspose3d(cin, cout, 3, stride, padding=1, output_padding=stride - 1))
        else:
            self.add_module("conv", nn.Conv3d(cin, cout, 3, stride, padding=1))
        if not conv_only:
            self.add_module("adn", _adn(cout))


class ResidualUnit(nn.Module):
    """``monai.networks.blocks.ResidualUnit``: ``subunits`` convolutions plus a (strided) residual path."""

    def __init__(self, cin: int, cout: int, stride: int, subunits: int, last_conv_only: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        c, s = cin, stride
        for n in range(max(1, subunits)):
            self.conv.add_module(f"unit{n}", Convolution(c, cout, s, conv_only=last_conv_only and n == subunits - 1))
            c, s = cout, 1
        if stride != 1 or cin != cout:
            kernel = 3 if stride != 1 else 1
            self.residual: nn.Module = nn.Conv3d(cin, cout, kernel, stride, padding=(kernel - 1) // 2)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class SkipConnection(nn.Module):
    """``monai.networks.layers.SkipConnection`` (mode "cat"): the input next to what the block made of it."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNet(nn.Module):
    """``monai.networks.nets.UNet(spatial_dims=3, ...)`` with ``num_res_units >= 1``."""

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int], strides: Sequence[int],
                 num_res_units: int = 1) -> None:
        super().__init__()
        if num_res_units < 1 or len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError("UNet needs num_res_units >= 1, two or more channels and one stride fewer")
        self.units = num_res_units
        self.model = self._block(in_channels, out_channels, list(channels), list(strides), top=True)

    def _block(self, cin: int, cout: int, channels: list[int], strides: list[int], top: bool) -> nn.Sequential:
        c, s = channels[0], strides[0]
        if len(channels) > 2:
            sub: nn.Module = self._block(c, c, channels[1:], strides[1:], top=False)
            up_in = 2 * c
        else:
            sub = ResidualUnit(c, channels[1], 1, self.units)  # the bottom
            up_in = c + channels[1]
        down = ResidualUnit(cin, c, s, self.units)
        up = nn.Sequential(Convolution(up_in, cout, s, transposed=True), ResidualUnit(cout, cout, 1, 1, last_conv_only=top))
        return nn.Sequential(down, SkipConnection(sub), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
