"""ADM (Dhariwal & Nichol 2021) as reimplemented by EDM: `DhariwalUNet`.

Module names (`map_*`, `enc.*`, `dec.*`, `out_norm`, `out_conv`) are those of the reference
`training/networks.py`, so its checkpoints load with `strict=True`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import silu

from edm_lab.nets.layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, UNetIO


class DhariwalUNet(UNetIO):
    """U-Net of ADM: positional noise embedding, scale/shift conditioning, multi-head attention
    with 64 channels per head (layers narrower than 64 channels get no attention).

    Called as F(x, noise_labels, class_labels, augment_labels=None) with x [N, in_channels, R, R];
    returns [N, out_channels, R, R].
    """

    def __init__(self,
                 img_resolution: int,                           # input/output resolution R
                 in_channels: int,                              # colour channels at the input
                 out_channels: int,                             # colour channels at the output
                 label_dim: int = 0,                            # classes; 0 = unconditional
                 augment_dim: int = 0,                          # augmentation labels; 0 = none
                 model_channels: int = 192,                     # base channel count
                 channel_mult: Sequence[int] = (1, 2, 3, 4),    # channel multiplier per resolution
                 channel_mult_emb: int = 4,                     # embedding width / model_channels
                 num_blocks: int = 3,                           # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (32, 16, 8),  # resolutions with self-attention
                 dropout: float = 0.10,                         # dropout of block activations
                 label_dropout: float = 0,                      # class-label dropout (classifier-free guidance)
                 ) -> None:
        super().__init__(img_resolution, in_channels, out_channels, label_dim, augment_dim, label_dropout)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping network. Registration order is the reference's (it fixes the seeded init draws).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        # Mapping: augmentation joins before the MLP, the class after it (as in ADM).
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = self.class_embedding_input(class_labels, x.shape[0], x.device)
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))
