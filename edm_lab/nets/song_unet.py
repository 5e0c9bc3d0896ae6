"""DDPM++ and NCSN++ (Song et al. 2021) as reimplemented by EDM: `SongUNet`.

Module names (`map_*`, `enc.{res}x{res}_*`, `dec.{res}x{res}_*`) are those of the reference
`training/networks.py`, so its checkpoints load with `strict=True`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import silu

from edm_lab.nets.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock,
                                   UNetIO)

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"SongUNet {name} must be one of {list(choices)}, got {value!r}")


class SongUNet(UNetIO):
    """U-Net of DDPM++ (positional embedding, standard encoder, [1,1] filter) and NCSN++
    (Fourier embedding, residual encoder, [1,3,3,1] filter).

    Called as F(x, noise_labels, class_labels, augment_labels=None) with x [N, in_channels, R, R],
    noise_labels [N], class_labels [N or 1, label_dim] (None when unconditional) and
    augment_labels [N, augment_dim]; returns [N, out_channels, R, R].
    """

    def __init__(self,
                 img_resolution: int,                           # input/output resolution R
                 in_channels: int,                              # colour channels at the input
                 out_channels: int,                             # colour channels at the output
                 label_dim: int = 0,                            # classes; 0 = unconditional
                 augment_dim: int = 0,                          # augmentation labels; 0 = none
                 model_channels: int = 128,                     # base channel count
                 channel_mult: Sequence[int] = (1, 2, 2, 2),    # channel multiplier per resolution
                 channel_mult_emb: int = 4,                     # embedding width / model_channels
                 num_blocks: int = 4,                           # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (16,),       # resolutions with self-attention
                 dropout: float = 0.10,                         # dropout of block activations
                 label_dropout: float = 0,                      # class-label dropout (classifier-free guidance)
                 embedding_type: str = "positional",            # 'positional' (DDPM++) | 'fourier' (NCSN++)
                 channel_mult_noise: int = 1,                   # noise embedding width / model_channels
                 encoder_type: str = "standard",                # 'standard' | 'skip' | 'residual' (NCSN++)
                 decoder_type: str = "standard",                # 'standard' | 'skip'
                 resample_filter: Sequence[int] = (1, 1),       # [1,1] DDPM++, [1,3,3,1] NCSN++
                 ) -> None:
        _check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        _check_choice("decoder_type", decoder_type, DECODER_TYPES)
        super().__init__(img_resolution, in_channels, out_channels, label_dim, augment_dim, label_dropout)
        resample_filter = list(resample_filter)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)  # near-zero, not zero: Song et al.'s choice
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ class, + augmentation) -> embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `caux` tracks the channels of the auxiliary (skip/residual) input pyramid.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder: consumes the encoder's skips in reverse; the output is the sum of the aux convs.
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
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos], as Song et al.
        if self.map_label is not None:
            labels = self.class_embedding_input(class_labels, x.shape[0], x.device)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
