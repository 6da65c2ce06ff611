"""The pure-PyTorch U-Net that fastunet replaces (the seed blog post's model), written anew.

Module names and order are the seed's, so ``state_dict`` keys match it exactly
(``Conv1.conv.0.weight``, ``Up5.up.1.weight``, ...). fastunet.U_Net is tested against this model.
"""

import torch
import torch.nn as nn


class conv_block(nn.Module):
    """(Conv3x3 pad 1 + BatchNorm + ReLU) x 2: ``[N, ch_in, H, W] -> [N, ch_out, H, W]``."""

    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class up_conv(nn.Module):
    """Nearest upsample x2 + Conv3x3 + BatchNorm + ReLU: ``[N, ch_in, h, w] -> [N, ch_out, 2h, 2w]``."""

    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.up(x)


class U_Net(nn.Module):
    """U-Net, five levels 64-128-256-512-1024: ``[N, img_ch, H, W] -> [N, output_ch, H, W]`` (H, W % 16 == 0)."""

    # The block classes; fastunet.U_Net swaps in its fused ones (same parameters, same init order).
    block_types = (conv_block, up_conv)

    def __init__(self, img_ch=3, output_ch=1):
        super().__init__()
        self.Maxpool = nn.MaxPool2d(kernel_size=2, stride=2)

        conv_block_t, up_conv_t = self.block_types
        self.Conv1 = conv_block_t(ch_in=img_ch, ch_out=64)
        self.Conv2 = conv_block_t(ch_in=64, ch_out=128)
        self.Conv3 = conv_block_t(ch_in=128, ch_out=256)
        self.Conv4 = conv_block_t(ch_in=256, ch_out=512)
        self.Conv5 = conv_block_t(ch_in=512, ch_out=1024)

        self.Up5 = up_conv_t(ch_in=1024, ch_out=512)
        self.Up_conv5 = conv_block_t(ch_in=1024, ch_out=512)

        self.Up4 = up_conv_t(ch_in=512, ch_out=256)
        self.Up_conv4 = conv_block_t(ch_in=512, ch_out=256)

        self.Up3 = up_conv_t(ch_in=256, ch_out=128)
        self.Up_conv3 = conv_block_t(ch_in=256, ch_out=128)

        self.Up2 = up_conv_t(ch_in=128, ch_out=64)
        self.Up_conv2 = conv_block_t(ch_in=128, ch_out=64)

        self.Conv_1x1 = nn.Conv2d(64, output_ch, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        x1 = self.Conv1(x)
        x2 = self.Conv2(self.Maxpool(x1))
        x3 = self.Conv3(self.Maxpool(x2))
        x4 = self.Conv4(self.Maxpool(x3))
        x5 = self.Conv5(self.Maxpool(x4))

        d5 = self.Up_conv5(torch.cat((x4, self.Up5(x5)), dim=1))
        d4 = self.Up_conv4(torch.cat((x3, self.Up4(d5)), dim=1))
        d3 = self.Up_conv3(torch.cat((x2, self.Up3(d4)), dim=1))
        d2 = self.Up_conv2(torch.cat((x1, self.Up2(d3)), dim=1))
        return self.Conv_1x1(d2)
