"""Per-seed noise from a counter-based generator, drawn for the whole batch in a few vectorised ops.

`CounterNoise` is a drop-in for `edm_lab.design.sampler.PerSampleNoise` (same `randn`, `randn_like`
and `randint`) that keeps the reference's protocol -- image i depends only on seed i, whatever the
batch it is drawn in, its position there or the batch size -- without the per-sample Python loop
(one torch.Generator and one small kernel per sample and draw, i.e. 1024 launches per draw at batch 1024).

Every value is a pure function of (seed, draw counter, element index within the sample):

* the seed is taken mod 2^32, as PerSampleNoise does (`manual_seed(seed % 2**32)`), so seeds that
  share a stream there share one here (negative seeds wrap the same way);
* the k-th call of `randn` / `randn_like` / `randint` on an object is draw k (a per-object counter),
  so sample i's values depend on seed i and on the sequence of calls, never on the other seeds;
* element j is element j of the sample flattened in C order, so a draw's first m values do not depend
  on its shape (randn((B, 3, 4)) is randn((B, 12)) reshaped, and randn((B, 5)) is randn((B, 8))[:, :5]).

It keeps the protocol, not the reference's bits: the reference draws each seed from its own
torch.Generator (Philox / MT19937 streams) and the golden vectors pin those exact values, which no
vectorised construction reproduces. So this is an opt-in fast path (a different noise realisation,
the same distribution); the eager default stays PerSampleNoise, bit-for-bit with the reference.

Construction (all in int64 tensors on the target device, each value kept in [0, 2^32) by masking
after every step; the largest intermediate is a 32-bit word times a constant < 2^30, i.e. < 2^62,
so nothing ever overflows int64 and every device computes the same integers):

    pcg(x)   the 32-bit PCG hash of Jarzynski & Olano 2020 ("Hash Functions for GPU Rendering", JCGT 9(3)),
             a bijection of [0, 2^32) with good avalanche;
    ck     = pcg(c_lo ^ pcg(c_hi))                 the draw counter c, both 32-bit halves (a Python int)
    A      = pcg(s ^ ck)                           per seed s and draw: the element key ...
    B      = pcg(A ^ pcg(ck ^ T_B))                ... and the word key; (A, B) is injective in (s, c < 2^32),
    K2, K3 = pcg(B ^ T_2), pcg(B ^ T_3)            so two draws share no stream structure unless the
                                                   64 bits of (A, B) nearly coincide (odds ~ size / 2^64)
    w1     = pcg(pcg((A + p) mod 2^32) ^ B)        per element (pair) index p: three chained words
    w2     = pcg(w1 ^ K2),  w3 = pcg(w2 ^ K3)

randn: Box-Muller in float64 on pair p -> elements 2p, 2p + 1: u1 = (m + 1) / 2^53 in (0, 1] from the
53-bit m = w1 * 2^21 + (w2 >> 11) (so log u1 is finite and the tail reaches |z| = 8.57), the angle
2 pi w3 / 2^32 (32 bits), z = sqrt(-2 log u1) (cos, sin); then cast to the requested dtype, so a float32
draw is the float64 draw rounded. The integer words are bit-identical on every device; the float64
log/cos/sin may differ in the last ulp between CPU and CUDA, so bitwise equality across batch
compositions holds on one device (and across devices up to that ulp). It rests on torch computing each
element of an elementwise op by the same code whatever its position in the tensor, true of the CUDA
kernels and of the CPU's vectorised ones (whose tails reuse the vector code); the tests check it.

randint(low, high): low + ((w1 * (high - low)) >> 32) with w1 on the element index (multiply-shift,
rejection-free). Each outcome gets floor or ceil of 2^32 / range words: a relative bias below
range / 2^32 (2e-9 for 10 classes). high - low must be in [1, 2^31] so the product stays below 2^63.

Cost per randn draw, whatever the batch size: four PCG hashes per pair of normals, about 110 kernels
in all (some 65 over half the draw's elements, mostly in place, the rest tiny ones on the seeds' keys),
instead of two per sample (1024 generator calls and their copies at batch 1024); transient memory
about 3.5 times the float64 draw. Meant for GPUs, where the per-sample loop is launch-bound; on
CPUs the hash is memory-bound and about as fast as the loop (single-threaded, batch 1024 x 3 x 32 x 32).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_PCG_MUL, _PCG_INC, _PCG_OUT = 747796405, 2891336453, 277803737
# Domain tags: any distinct 32-bit constants (golden ratio and murmur3's fmix constants), so that the
# word key and the chain keys are distinct functions of the same inputs.
_TAG_B, _TAG_2, _TAG_3 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
_MAX_RANGE = 1 << 31  # (2^32 - 1) * 2^31 < 2^63: the multiply-shift of randint stays exact in int64
_TWO_PI_OVER_2_32 = 2 * math.pi / 2 ** 32


def pcg_hash_int(x: int) -> int:
    """The PCG hash of one 32-bit Python int (for the scalar draw counter)."""
    state = (x * _PCG_MUL + _PCG_INC) & MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * _PCG_OUT) & MASK32
    return (word >> 22) ^ word


def pcg_hash(x: Tensor) -> Tensor:
    """The PCG hash, elementwise, of an int64 tensor holding 32-bit words (values in [0, 2^32))."""
    return _pcg_(x.clone(), torch.empty_like(x))


def _pcg_(x: Tensor, scratch: Tensor) -> Tensor:
    """x <- pcg(x) in place, clobbering `scratch` (same shape): products are < 2^62, exact in int64, and
    the mask after each multiply keeps the words 32-bit. In place because fresh allocations of the large
    per-element tensors (page faults on CPU) cost more than the arithmetic."""
    x.mul_(_PCG_MUL).add_(_PCG_INC).bitwise_and_(MASK32)
    torch.bitwise_right_shift(x, 28, out=scratch).add_(4)  # the shift, 4..19, taken from the top 4 bits
    torch.bitwise_right_shift(x, scratch, out=scratch)
    x.bitwise_xor_(scratch).mul_(_PCG_OUT).bitwise_and_(MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 22, out=scratch))


class CounterNoise:
    """Standard-normal (and uniform integer) draws per sample seed from a counter-based hash.

    Same interface as PerSampleNoise: `randn(size)` with size[0] == the number of seeds, `randn_like(x)`,
    `randint(high | low, high, size=...)`. Sample i's values depend only on seed i and on the sequence
    of calls made on this object (see the module docstring); the whole batch is one set of tensor ops.
    """

    def __init__(self, seeds: Iterable[int] | Tensor, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if isinstance(seeds, Tensor):
            if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
                raise TypeError(f"seeds must be integers, got {seeds.dtype}")
            if seeds.dim() != 1:
                raise ValueError(f"seeds must be one-dimensional, got shape {tuple(seeds.shape)}")
            words = seeds.to(device=self.device, dtype=torch.int64) % (1 << 32)
        else:
            # Python ints first: any int, however large, reduces mod 2^32 like PerSampleNoise's manual_seed.
            words = torch.tensor([int(seed) % (1 << 32) for seed in seeds], dtype=torch.int64, device=self.device)
        self.seeds = words
        self.draws = 0  # calls so far: the counter of the next draw

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, size: Sequence[int] | torch.Size, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, layout: torch.layout | None = None) -> Tensor:
        """Standard normals of shape `size`, row i from seed i; one draw of the counter."""
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"randn needs a floating dtype, got {dtype}")
        num, device = self._check(size, layout, device)
        pairs = (num + 1) // 2
        _check_index(pairs, "pairs of elements")
        a, b, k2, k3 = self._keys(device)  # after the checks: a refused call consumes no draw
        w, scratch = _element_words(a, b, pairs)  # w1
        # u1 in (0, 1] from 53 bits: m + 1 <= 2^53 is exact in float64, and u1 > 0 keeps log finite.
        m = w << 21
        _pcg_(w.bitwise_xor_(k2), scratch)  # w2
        m.bitwise_or_(torch.bitwise_right_shift(w, 11, out=scratch)).add_(1)
        _pcg_(w.bitwise_xor_(k3), scratch)  # w3
        radius = torch.empty(m.shape, dtype=torch.float64, device=device).copy_(m)
        radius.mul_(2.0 ** -53).log_().mul_(-2.0).sqrt_()
        angle = torch.empty(w.shape, dtype=torch.float64, device=device).copy_(w).mul_(_TWO_PI_OVER_2_32)
        out = torch.empty((len(self.seeds), pairs, 2), dtype=torch.float64, device=device)
        torch.cos(angle, out=out[..., 0]).mul_(radius)  # pair p -> elements 2p, 2p + 1
        torch.mul(radius, angle.sin_(), out=out[..., 1])
        return out.view(len(self.seeds), 2 * pairs)[:, :num].reshape(tuple(size)).to(dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normals shaped like x (its dtype and device), row i from seed i."""
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *bounds: int, size: Sequence[int] | torch.Size, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, layout: torch.layout | None = None) -> Tensor:
        """Uniform integers in [low, high) like torch.randint(high | low, high, size=...), row i from seed i.

        Multiply-shift of one hashed 32-bit word per element: relative bias < (high - low) / 2^32,
        which needs 1 <= high - low <= 2^31 (exact int64 product). One draw of the counter.
        """
        if len(bounds) == 1:
            low, high = 0, int(bounds[0])
        elif len(bounds) == 2:
            low, high = int(bounds[0]), int(bounds[1])
        else:
            raise TypeError(f"randint takes (high) or (low, high), got {len(bounds)} bounds")
        span = high - low
        if not 1 <= span <= _MAX_RANGE:
            raise ValueError(f"randint needs 1 <= high - low <= 2^31, got [{low}, {high})")
        num, device = self._check(size, layout, device)
        _check_index(num, "elements")
        a, b, _, _ = self._keys(device)
        values = _element_words(a, b, num)[0].mul_(span).bitwise_right_shift_(32).add_(low)
        return values.reshape(tuple(size)).to(torch.int64 if dtype is None else dtype)

    def _check(self, size: Sequence[int] | torch.Size, layout: torch.layout | None,
               device: torch.device | str | None) -> tuple[int, torch.device]:
        """The number of elements per sample and the device to draw on; checks the batch against the seeds."""
        if len(size) == 0 or size[0] != len(self.seeds):
            raise ValueError(f"batch of {size[0] if len(size) else 'no rows'} does not match {len(self.seeds)} seeds")
        if layout not in (None, torch.strided):
            raise ValueError(f"only the strided layout is supported, got {layout}")
        return math.prod(int(n) for n in size[1:]), self.device if device is None else torch.device(device)

    def _keys(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The (num_seeds, 1) keys A, B, K2, K3 of this draw (see the module docstring); advances the counter."""
        counter, self.draws = self.draws, self.draws + 1
        # The counter is a scalar: hash it in Python, both 32-bit halves, at no tensor cost.
        ck = pcg_hash_int((counter & MASK32) ^ pcg_hash_int((counter >> 32) & MASK32))
        seeds = self.seeds.to(device)
        scratch = torch.empty_like(seeds)
        a = _pcg_(seeds ^ ck, scratch)
        b = _pcg_(a ^ pcg_hash_int(ck ^ _TAG_B), scratch)
        k2, k3 = pcg_hash(torch.stack((b ^ _TAG_2, b ^ _TAG_3)))  # one hash for both: fewer small kernels
        return a[:, None], b[:, None], k2[:, None], k3[:, None]


def _element_words(a: Tensor, b: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """w1 = pcg(pcg((A + p) mod 2^32) ^ B) for p in [0, count): (num_seeds, count) words, and a scratch
    tensor of the same shape for the caller's further hashing."""
    w = a + torch.arange(count, dtype=torch.int64, device=a.device)
    scratch = torch.empty_like(w)
    return _pcg_(_pcg_(w.bitwise_and_(MASK32), scratch).bitwise_xor_(b), scratch), scratch


def _check_index(count: int, what: str) -> None:
    # The element (pair) index is one 32-bit word of the hash; beyond it streams would repeat.
    if count > 1 << 32:
        raise ValueError(f"a sample of more than 2^32 {what} is not supported, got {count}")
