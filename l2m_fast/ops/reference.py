"""The sampling contract in plain PyTorch: the spec, the test oracle and the last-resort fallback.

**The sampling contract.** Every backend (C++ on CPU, Triton on GPU, this reference) computes the same
thing. A posterior covers P scalar parameters in one *global flat order*: the covered parameters in the
model's ``named_parameters()`` order, each tensor flattened row-major with its whole (unsharded) shape,
so a shard's elements keep the indices they have in the whole tensor. For element ``i`` (int64),
sample ``s`` (``0 <= s < 2^32``) and a 64-bit ``seed``:

1. Philox4x32-10 (Salmon et al. 2011; the generator of cuRAND, Random123 and Triton's ``tl.philox``)
   with key ``(seed & 0xFFFFFFFF, seed >> 32)`` and counter ``(i & 0xFFFFFFFF, i >> 32, s >> 2, 0)``
   gives four 32-bit words ``r0, r1, r2, r3``. Known answers (Random123): key (0, 0), counter
   (0, 0, 0, 0) -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8; key (ffffffff, ffffffff), counter all
   ffffffff -> 408f276d 41c83b0e a20bc7c6 6d5451fd; key (a4093822, 299f31d0), counter (243f6a88,
   85a308d3, 13198a2e, 03707344) -> d16cfe09 94fdcceb 5001e420 24126ea1.
2. Uniforms, exact in float32: ``ua = ((r0 >> 8) + 1) * 2^-24`` in (0, 1], ``ub = (r1 >> 8) * 2^-24``
   in [0, 1); likewise ``uc, ud`` from ``r2, r3``.
3. Box-Muller: ``rad = sqrt(-2 ln ua)``; ``z(4k) = rad cos(2 pi ub)``, ``z(4k+1) = rad sin(2 pi ub)``;
   ``z(4k+2), z(4k+3)`` the same from ``uc, ud``. One Philox call serves four samples of one element.
4. ``sigma_i = 1 / sqrt(a_g v_i + b_g)`` in float32, ``(a_g, b_g)`` the coefficients of the segment
   ``g`` holding element i; ``out[s, i] = theta_i + sigma_i * z(s, i)`` computed in float32 and rounded
   once to the output dtype (float32, bfloat16 or float16).

Consequences every backend's tests pin down: a sample depends only on ``(seed, i, s)``, so it is the
same whatever the chunking of samples (``sample_offset``), the subset or shard of elements
(``element_offset``), the block size, the thread count and the device. Backends agree on the Philox
words exactly and on ``z`` to a few float32 ulp (their transcendentals differ; each backend states
its bound); ``|z| <= sqrt(-2 ln 2^-24) ~= 5.77`` by construction.

Integer arithmetic here is done in int64 tensors holding unsigned 32-bit values, so the reference runs
on any device PyTorch supports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "philox4x32_ref",
    "uniforms_ref",
    "normals_ref",
    "segment_ids_ref",
    "sample_diag_gaussian_ref",
]

_MASK32 = 0xFFFFFFFF
_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_TWO_NEG24 = 2.0**-24
_TWO_PI = 2.0 * math.pi

# Elements processed at once by the reference: bounds its int64 temporaries to a few hundred MB.
_CHUNK = 1 << 18


def _mulhilo(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``m * x`` for a 32-bit constant and a tensor of 32-bit values.

    The 64-bit product is formed from 16-bit halves so that no intermediate leaves int64's range.
    """
    m_lo, m_hi = m & 0xFFFF, m >> 16
    x_lo, x_hi = x & 0xFFFF, x >> 16
    ll = x_lo * m_lo
    lh = x_lo * m_hi
    hl = x_hi * m_lo
    hh = x_hi * m_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = (ll & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & _MASK32, lo


def philox4x32_ref(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, key: tuple[int, int], rounds: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Salmon et al. 2011) on int64 tensors holding unsigned 32-bit words.

    Args:
        c0, c1, c2, c3: counter words, int64 tensors of one broadcastable shape, values in [0, 2^32).
        key: ``(k0, k1)``, each in [0, 2^32).
        rounds: number of rounds (10 for the contract).

    Returns:
        The four output words, int64 tensors with values in [0, 2^32).
    """
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def uniforms_ref(r0: Tensor, r1: Tensor) -> tuple[Tensor, Tensor]:
    """The contract's float32 uniforms: ``ua`` in (0, 1] from ``r0``, ``ub`` in [0, 1) from ``r1``."""
    ua = ((r0 >> 8) + 1).to(torch.float32) * _TWO_NEG24
    ub = (r1 >> 8).to(torch.float32) * _TWO_NEG24
    return ua, ub


def _box_muller(ua: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    rad = torch.sqrt(-2.0 * torch.log(ua))
    ang = ub * _TWO_PI
    return rad * torch.cos(ang), rad * torch.sin(ang)


def _split_seed(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed & _MASK32, seed >> 32


def normals_ref(
    num_elements: int,
    num_samples: int,
    seed: int,
    sample_offset: int = 0,
    element_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal draws ``z(s, i)`` of the contract, float32.

    Args:
        num_elements: P, number of elements (global indices ``element_offset + j``).
        num_samples: S, number of samples (sample indices ``sample_offset + s``).
        seed: 64-bit seed, any Python int (taken modulo 2^64).
        sample_offset: index of the first sample.
        element_offset: global index of the first element.
        device: where to compute.

    Returns:
        z: (S, P) float32.
    """
    key = _split_seed(seed)
    z = torch.empty(num_samples, num_elements, dtype=torch.float32, device=device)
    if num_samples == 0 or num_elements == 0:
        return z
    q_first = sample_offset >> 2
    q_last = (sample_offset + num_samples - 1) >> 2
    for start in range(0, num_elements, _CHUNK):
        stop = min(start + _CHUNK, num_elements)
        idx = torch.arange(element_offset + start, element_offset + stop, dtype=torch.int64, device=device)
        c0 = idx & _MASK32
        c1 = idx >> 32
        for q in range(q_first, q_last + 1):
            c2 = torch.full_like(c0, q & _MASK32)
            c3 = torch.zeros_like(c0)
            r0, r1, r2, r3 = philox4x32_ref(c0, c1, c2, c3, key)
            ua, ub = uniforms_ref(r0, r1)
            uc, ud = uniforms_ref(r2, r3)
            quad = (*_box_muller(ua, ub), *_box_muller(uc, ud))
            for w in range(4):
                s = 4 * q + w - sample_offset
                if 0 <= s < num_samples:
                    z[s, start:stop] = quad[w]
    return z


def segment_ids_ref(bounds: Tensor, num_elements: int) -> Tensor:
    """Segment of each local element: ``g`` with ``bounds[g] <= j < bounds[g + 1]``.

    Args:
        bounds: (G + 1,) int64, non-decreasing, ``bounds[0] == 0`` and ``bounds[G] == P``.
        num_elements: P.

    Returns:
        (P,) int64 segment ids.
    """
    j = torch.arange(num_elements, dtype=torch.int64, device=bounds.device)
    return torch.searchsorted(bounds[1:].contiguous(), j, right=True)


def sample_diag_gaussian_ref(
    theta: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    bounds: Tensor,
    seed: int,
    sample_offset: int,
    element_offset: int,
    out: Tensor,
) -> None:
    """Reference for the fused sampler: writes ``out[s, j] = theta_j + z(s0 + s, i0 + j) / sqrt(a_g v_j + b_g)``.

    Args:
        theta: (P,) float32, the mean.
        v: (P,) float32, the second moment.
        a: (G,) float32, per-segment scale of ``v`` in the precision.
        b: (G,) float32, per-segment additive precision.
        bounds: (G + 1,) int64, segment ``g`` covers local elements ``bounds[g] .. bounds[g+1]-1``.
        seed: 64-bit seed (a signed int64 is read as its unsigned bit pattern).
        sample_offset: s0, the global index of the first sample.
        element_offset: i0, the global flat index of ``theta[0]``.
        out: (S, P) float32, bfloat16 or float16, written in place.
    """
    num_samples, num_elements = out.shape
    bl = bounds.tolist()
    if not bl or bl[0] != 0 or bl[-1] != num_elements or any(x > y for x, y in zip(bl, bl[1:])):
        raise ValueError(
            f"bounds must be non-decreasing from 0 to P = {num_elements}, got {bl[:8]}{'...' if len(bl) > 8 else ''}"
        )
    if num_samples == 0 or num_elements == 0:
        return
    seg = segment_ids_ref(bounds, num_elements)
    precision = a.float()[seg] * v.float() + b.float()[seg]
    sigma = torch.sqrt(precision).reciprocal()
    z = normals_ref(num_elements, num_samples, seed, sample_offset, element_offset, device=out.device)
    out.copy_(torch.addcmul(theta.float().unsqueeze(0), z, sigma.unsqueeze(0)))
