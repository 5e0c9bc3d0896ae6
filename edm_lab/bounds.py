"""Bounds on what one network spec may ask for, shared by the config schema and the checkpoint loaders.

Plain Python (no torch): `edm_lab.tasks.schema` checks `net=...` configs against these before torch is
imported, and `edm_lab.nets.denoisers.check_spec` checks specs read from files before anything is built.
"""
from __future__ import annotations

SPEC_BOUNDS: dict[str, tuple[int, int]] = {
    "img_resolution": (1, 4096),
    "in_channels": (1, 256),
    "out_channels": (1, 512),
    "img_channels": (1, 256),
    "label_dim": (0, 100_000),
    "augment_dim": (0, 1024),
    "model_channels": (1, 8192),
    "channel_mult_emb": (1, 64),
    "channel_mult_noise": (1, 64),
    "num_blocks": (0, 16),
    "M": (1, 10_000),
    "len(channel_mult)": (1, 8),
    "channel_mult[i]": (1, 64),
    "len(attn_resolutions)": (0, 64),
    "len(resample_filter)": (1, 16),
}
"""Inclusive bounds on a spec's structural integers (precond and network kwargs of these names,
so `M` bounds VP's M too); `len(x)` bounds the length of list x, `x[i]` each of its entries.

Far above the paper's networks (conf/net/: model_channels <= 192, num_blocks <= 4, at most 4
resolutions, iDDPM M = 1000), they keep what one spec can ask for cheap to check: building a
network on the meta device costs time per module (about 1.5 s at num_blocks=16 with 8
resolutions) and iDDPM's table is a sequential recursion of M steps (0.45 s at M=10,000)."""
