"""Device functions shared by the Triton samplers: Philox, Box-Muller in three numeric modes, the row writer.

The flat kernel (:mod:`.triton_kernel`) and the segment kernel (:mod:`.triton_segments`) differ only
in how a program finds its elements; both call :func:`write_samples`, which walks a range of quads
(groups of four samples sharing one Philox call, contract step 1) and stores rows. The math follows
the contract in :mod:`l2m_fast.ops.reference`; its accuracy is stated in :mod:`.triton_kernel` and
checked exhaustively on the CPU by the tests (``precise`` mode uses only Triton-language arithmetic
with explicit roundings, so the interpreter computes the GPU's bits).

**Polynomials.** Minimax fits (Lawson's iteratively reweighted least squares in float64, then
rounded to float32), relative error for the logarithm, absolute for sine and cosine:

* ``-2 log1p(f) = f (-2 + c1 f + ... + c8 f^8)`` on ``|f| <= 1/3``: fit error 2.6e-8 relative;
* ``sin x = x + x^3 (s1 + s2 x^2 + s3 x^4 + s4 x^6)`` on ``|x| <= pi/2 + 1e-3``: 4.7e-9;
* ``cos x = 1 + x^2 (c1 + ... + c5 x^8)`` on the same interval: 2.5e-10.

This module imports without Triton (it then defines nothing).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
    from triton.language.target_info import is_cuda

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]

if HAS_TRITON:
    __all__ += [
        "counter_words",
        "inv_sqrt_rn",
        "philox_quad",
        "neg2_log_uniform",
        "sqrt_rn_normal",
        "radius",
        "bm_prepare",
        "bm_cos",
        "bm_sin",
        "write_samples",
    ]

    # Compiled (not interpreted) kernels may use inline PTX where the target is CUDA.
    _COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
    _MUL_M0 = tl.constexpr("{ .reg .b64 t; mul.wide.u32 t, $2, 3528531795; mov.b64 {$0, $1}, t; }")
    _MUL_M1 = tl.constexpr("{ .reg .b64 t; mul.wide.u32 t, $2, 3449720151; mov.b64 {$0, $1}, t; }")

    @triton.jit
    def _mulhilo(x, m: tl.constexpr, ASM: tl.constexpr):
        """High and low words of ``x * m`` (uint32 block ``x``, 32-bit constant ``m``): one widening multiply.

        On CUDA through PTX ``mul.wide.u32`` (``IMAD.WIDE.U32``), which the compiler otherwise loses
        when it merges the surrounding 32-bit XORs into 64-bit ones; elsewhere in uint64 arithmetic.
        """
        if _COMPILED and is_cuda():
            lo, hi = tl.inline_asm_elementwise(ASM, "=r,=r,r", [x], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
            return hi, lo
        else:
            p = x.to(tl.uint64) * m
            return (p >> 32).to(tl.uint32), p.to(tl.uint32)

    @triton.jit
    def philox_quad(seed, c0, c1, q):
        """Contract step 1: the four Philox4x32-10 words of counter ``(c0, c1, q, 0)``, key from ``seed``.

        ``c0, c1``: uint32 blocks (element index low and high words); ``q``: the quad ``s >> 2`` (a
        uint32 scalar or block); ``seed``: int64, key ``(seed lo, seed hi)``. The same rounds as
        ``tl.philox``, each product formed by one widening multiply rather than separate high and low
        multiplies; the first round's product of the (uniform) quad index stays scalar.
        """
        key = tl.cast(seed, tl.int64).to(tl.uint64)
        k0 = (key & 0xFFFFFFFF).to(tl.uint32)
        k1 = (key >> 32).to(tl.uint32)
        p = tl.cast(q, tl.uint32).to(tl.uint64) * 0xCD9E8D57
        hi0, lo0 = _mulhilo(c0, 0xD2511F53, _MUL_M0)
        c0, c1, c2, c3 = (p >> 32).to(tl.uint32) ^ c1 ^ k0, p.to(tl.uint32), hi0 ^ k1, lo0
        for _ in tl.static_range(9):
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
            hi0, lo0 = _mulhilo(c0, 0xD2511F53, _MUL_M0)
            hi1, lo1 = _mulhilo(c2, 0xCD9E8D57, _MUL_M1)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        return c0, c1, c2, c3

    @triton.jit
    def counter_words(i, v):
        """Counter words ``(i lo, i hi)`` of the int64 element indices ``i``, tied to the loaded ``v``.

        The low word is 0 where ``v`` is NaN, whose samples are NaN whatever ``z``; elsewhere it is
        exact. The dependence on a loaded tensor makes the compiler give the whole sample
        computation the loads' (and stores') layout; without it the Philox chain, shared by four
        stores, keeps a default layout and each store needs a layout conversion through shared memory.
        """
        return tl.where(v != v, 0, i.to(tl.uint32)), (i >> 32).to(tl.uint32)

    @triton.jit
    def inv_sqrt_rn(p):
        """``sigma = RN(1 / RN(sqrt(p)))``, IEEE bit for bit (contract step 4) for normal ``p`` below 2^126.

        The IEEE square root of :func:`sqrt_rn_normal`, then the reciprocal from the same ``1/sqrt``
        estimate: one Newton step to within an ulp, one correction (Markstein), correctly rounded.
        No slow path: outside that range (never a valid precision in practice; ``p = 0`` gives NaN) the
        result is not IEEE.
        """
        y = tl.math.rsqrt(p)
        s = p * y
        s = tl.fma(tl.fma(-s, s, p), 0.5 * y, s)  # RN(sqrt(p))
        y = tl.fma(y, tl.fma(-s, y, 1.0), y)  # ~1/s within an ulp
        return tl.fma(y, tl.fma(-s, y, 1.0), y)

    @triton.jit
    def neg2_log_uniform(r):
        """``-2 ln(ua)`` for ``ua = ((r >> 8) + 1) 2^-24`` (contract step 2), float32; ``r``: uint32 block.

        ``ua = m 2^e`` with ``m`` in [2/3, 4/3) (integer split of the float bits), ``f = m - 1`` exact,
        ``-2 ln ua = -2 e ln2 + f P(f)``, at least 1e-30. Relative error <= 1.5e-7 over all 2^24 inputs.
        """
        ua = tl.fma((r >> 8).to(tl.float32), 5.9604644775390625e-08, 5.9604644775390625e-08)  # exact
        bits = ua.to(tl.int32, bitcast=True)
        t = bits - 0x3F2AAAAB  # bits of 2/3
        e = t >> 23  # arithmetic shift: the exponent, in [-24, 0]
        f = (bits - (t & -8388608)).to(tl.float32, bitcast=True) - 1.0  # -8388608 = 0xFF800000
        p = tl.fma(-0.28052806854248047, f, 0.3077715039253235)
        p = tl.fma(p, f, -0.279915988445282)
        p = tl.fma(p, f, 0.32831910252571106)
        p = tl.fma(p, f, -0.40022337436676025)
        p = tl.fma(p, f, 0.5001564025878906)
        p = tl.fma(p, f, -0.6666639447212219)
        p = tl.fma(p, f, 0.9999987483024597)
        p = tl.fma(p, f, -2.0)
        # + 1e-30: the result is never 0 (ua = 1), so the square root needs no special case
        return tl.fma(e.to(tl.float32), -1.3862943649291992, tl.fma(p, f, 1e-30))

    @triton.jit
    def sqrt_rn_normal(x):
        """IEEE (correctly rounded) ``sqrt(x)`` for normal ``x`` in [1e-30, 2^126), without a slow path.

        The fast path of PTX ``sqrt.rn.f32``: ``s = x y`` from ``y ~ 1/sqrt(x)``, then one correction
        ``s + (x - s^2) y / 2`` with the residual by an FMA.
        """
        y = tl.math.rsqrt(x)
        s = x * y
        return tl.fma(tl.fma(-s, s, x), 0.5 * y, s)

    @triton.jit
    def radius(r, MATH: tl.constexpr):
        """Box-Muller radius ``sqrt(-2 ln ua)`` from the word ``r`` (portable: ``tl.log`` of ``ua``)."""
        if MATH == 0:
            ua = ((r >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
            return tl.sqrt_rn(-2.0 * tl.log(ua))
        else:
            return sqrt_rn_normal(neg2_log_uniform(r))

    @triton.jit
    def _sincos_approx(x):
        """Hardware ``sin.approx``/``cos.approx`` (NVIDIA only): |error| <= 2^-20.9 on [-pi, pi]."""
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        return s, c

    @triton.jit
    def bm_prepare(r_a, r_b, MATH: tl.constexpr):
        """The shared part of one Box-Muller pair: ``(rad', x)`` such that :func:`bm_cos` and :func:`bm_sin` finish it.

        precise: ``ang = fl(ub * fl(2 pi))`` exactly as the reference rounds it, reduced once to
        ``ang = x + k pi`` with ``|x| <= pi/2`` (``k pi`` removed in two steps, the first exact), and
        ``rad' = (-1)^k rad``; fast: ``x = 2 pi ub - pi``, ``rad' = -rad``; portable: ``x = ang``.
        """
        rad = radius(r_a, MATH)
        kb = (r_b >> 8).to(tl.float32)
        if MATH == 1:
            ang = kb * 3.7450703871400037e-07  # fl(2 pi) 2^-24: equals fl(fl(ub) * fl(2 pi)) bit for bit
            t = tl.fma(ang, 0.31830987334251404, 12582912.0)  # 1.5 * 2^23: rounds ang / pi to an integer k
            k = t - 12582912.0
            x = tl.fma(k, -3.1415927410125732, ang)  # exact (Sterbenz)
            x = tl.fma(k, 8.742277657347586e-08, x)  # the rest of k pi
            sign = t.to(tl.uint32, bitcast=True) << 31  # k odd: cos and sin change sign
            rad = (rad.to(tl.uint32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)
        elif MATH == 2:
            x = tl.fma(kb, 3.7450703871400037e-07, -3.1415927410125732)  # in [-pi, pi)
            rad = -rad
        else:
            x = kb * 5.9604644775390625e-08 * 6.283185307179586
        return rad, x

    @triton.jit
    def _poly_cos(t):
        """``cos x = 1 + t C(t)``, ``t = x^2``: the factor ``1 + t C(t)`` (no further multiply)."""
        c = tl.fma(-2.607526710107777e-07, t, 2.4761786335147917e-05)
        c = tl.fma(c, t, -0.0013888401445001364)
        c = tl.fma(c, t, 0.04166664183139801)
        c = tl.fma(c, t, -0.5)
        return tl.fma(c, t, 1.0)

    @triton.jit
    def _poly_sin(t):
        """``sin x = x (1 + t S(t))``, ``t = x^2``: the factor ``1 + t S(t)``."""
        s = tl.fma(2.59986222772568e-06, t, -0.0001980652887141332)
        s = tl.fma(s, t, 0.008333016186952591)
        s = tl.fma(s, t, -0.16666656732559204)
        return tl.fma(s, t, 1.0)

    @triton.jit
    def bm_cos(rad, x, MATH: tl.constexpr):
        """``z = rad cos(2 pi ub)`` from :func:`bm_prepare`'s ``(rad', x)``."""
        if MATH == 1:
            return rad * _poly_cos(x * x)
        elif MATH == 2:
            return rad * _sincos_approx(x)[1]
        else:
            return rad * tl.cos(x)

    @triton.jit
    def bm_sin(rad, x, MATH: tl.constexpr):
        """``z = rad sin(2 pi ub)`` from :func:`bm_prepare`'s ``(rad', x)``."""
        if MATH == 1:
            return rad * (x * _poly_sin(x * x))
        elif MATH == 2:
            return rad * _sincos_approx(x)[0]
        else:
            return rad * tl.sin(x)

    @triton.jit
    def bm_cos_or_sin(rad, x, odd, MATH: tl.constexpr):
        """:func:`bm_sin` where the scalar ``odd`` holds, else :func:`bm_cos`, bit for bit, without a branch.

        precise: one polynomial whose coefficients are chosen once per program (the sine's with a
        leading zero, which changes no bit of its Horner steps); other modes compute both and select.
        """
        if MATH == 1:
            t = x * x
            p = tl.where(odd, 0.0, -2.607526710107777e-07)
            p = tl.fma(p, t, tl.where(odd, 2.59986222772568e-06, 2.4761786335147917e-05))
            p = tl.fma(p, t, tl.where(odd, -0.0001980652887141332, -0.0013888401445001364))
            p = tl.fma(p, t, tl.where(odd, 0.008333016186952591, 0.04166664183139801))
            p = tl.fma(p, t, tl.where(odd, -0.16666656732559204, -0.5))
            p = tl.fma(p, t, 1.0)
            return rad * (tl.where(odd, x, 1.0) * p)
        else:
            return tl.where(odd, bm_sin(rad, x, MATH), bm_cos(rad, x, MATH))

    @triton.jit
    def _store_row(ptr, offs, val, body_mask, tail_mask, TAIL: tl.constexpr):
        """One row: a vector-friendly masked store, and with ``TAIL`` the scalar leftovers after it."""
        val = val.to(ptr.dtype.element_ty)
        tl.store(ptr + offs, val, mask=body_mask, cache_modifier=".cs")  # streaming (st.global.cs)
        if TAIL:
            tl.store(ptr + offs, val, mask=tail_mask, cache_modifier=".cs")

    @triton.jit
    def write_samples(
        out_ptr,
        offs,
        body_mask,
        tail_mask,
        row_stride,
        theta,
        sigma,
        c0,
        c1,
        seed,
        s0,
        num_s,
        qa,
        qb,
        ONE_ROW: tl.constexpr,
        TAIL: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """Writes ``out[row, offs] = theta + sigma z`` for the rows of quads ``[qa, qb)`` that lie in ``[0, S)``.

        Args (blocks have the kernel's one layout):
            out_ptr: pointer to row 0 of this program's first element; row ``r`` is at ``r * row_stride``.
            offs: element offsets (int block); ``body_mask``/``tail_mask``: the elements stored by the
                vector store and, with ``TAIL``, by the scalar store after it.
            theta, sigma: float32 blocks. c0, c1: uint32 blocks, the element index's words.
            seed: int64. s0, num_s: first sample index and S (int64). qa, qb: quad range (int64).
            ONE_ROW: S = 1, straight-line code: the word pair and cosine or sine picked by ``s0 % 4``.
        """
        if ONE_ROW:
            r0, r1, r2, r3 = philox_quad(seed, c0, c1, (s0 >> 2).to(tl.uint32))
            high = (s0 & 2) != 0
            rad, x = bm_prepare(tl.where(high, r2, r0), tl.where(high, r3, r1), MATH)
            z = bm_cos_or_sin(rad, x, (s0 & 1) != 0, MATH)
            _store_row(out_ptr, offs, tl.fma(sigma, z, theta), body_mask, tail_mask, TAIL)
        else:
            _write_quads(
                out_ptr,
                offs,
                body_mask,
                tail_mask,
                row_stride,
                theta,
                sigma,
                c0,
                c1,
                seed,
                s0,
                num_s,
                qa,
                qb,
                TAIL,
                MATH,
            )

    @triton.jit
    def _write_quads(
        out_ptr,
        offs,
        body_mask,
        tail_mask,
        row_stride,
        theta,
        sigma,
        c0,
        c1,
        seed,
        s0,
        num_s,
        qa,
        qb,
        TAIL: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """:func:`write_samples` for any S: a loop over whole quads, then the partial ones."""
        f_lo = (s0 + 3) >> 2  # quads with all four rows in [0, S): [f_lo, f_hi)
        f_hi = (s0 + num_s) >> 2
        for q in range(tl.maximum(qa, f_lo), tl.minimum(qb, f_hi)):
            row = q * 4 - s0
            ptr = out_ptr + row * row_stride
            r0, r1, r2, r3 = philox_quad(seed, c0, c1, tl.cast(q, tl.uint32))
            rad, x = bm_prepare(r0, r1, MATH)
            _store_row(ptr, offs, tl.fma(sigma, bm_cos(rad, x, MATH), theta), body_mask, tail_mask, TAIL)
            _store_row(ptr + row_stride, offs, tl.fma(sigma, bm_sin(rad, x, MATH), theta), body_mask, tail_mask, TAIL)
            rad, x = bm_prepare(r2, r3, MATH)
            ptr += 2 * row_stride
            _store_row(ptr, offs, tl.fma(sigma, bm_cos(rad, x, MATH), theta), body_mask, tail_mask, TAIL)
            _store_row(ptr + row_stride, offs, tl.fma(sigma, bm_sin(rad, x, MATH), theta), body_mask, tail_mask, TAIL)
        # The partial quads, at most two (the first and the last), outside the loop.
        q_first = s0 >> 2
        q_last = (s0 + num_s - 1) >> 2
        if (qa <= q_first) & (q_first < qb) & ((q_first < f_lo) | (q_first >= f_hi)):
            _partial_quad(
                out_ptr,
                offs,
                body_mask,
                tail_mask,
                row_stride,
                theta,
                sigma,
                c0,
                c1,
                seed,
                q_first * 4 - s0,
                q_first,
                num_s,
                TAIL,
                MATH,
            )
        if (q_last != q_first) & (qa <= q_last) & (q_last < qb) & ((q_last < f_lo) | (q_last >= f_hi)):
            _partial_quad(
                out_ptr,
                offs,
                body_mask,
                tail_mask,
                row_stride,
                theta,
                sigma,
                c0,
                c1,
                seed,
                q_last * 4 - s0,
                q_last,
                num_s,
                TAIL,
                MATH,
            )

    @triton.jit
    def _partial_quad(
        out_ptr,
        offs,
        body_mask,
        tail_mask,
        row_stride,
        theta,
        sigma,
        c0,
        c1,
        seed,
        row,
        q,
        num_s,
        TAIL: tl.constexpr,
        MATH: tl.constexpr,
    ):
        """Quad ``q`` (rows ``row .. row + 3``) where some rows fall outside ``[0, S)``: uniform branches skip them."""
        ptr = out_ptr + row * row_stride
        r0, r1, r2, r3 = philox_quad(seed, c0, c1, tl.cast(q, tl.uint32))
        if (row + 1 >= 0) & (row < num_s):
            rad, x = bm_prepare(r0, r1, MATH)
            if row >= 0:
                _store_row(ptr, offs, tl.fma(sigma, bm_cos(rad, x, MATH), theta), body_mask, tail_mask, TAIL)
            if row + 1 < num_s:
                z = bm_sin(rad, x, MATH)
                _store_row(ptr + row_stride, offs, tl.fma(sigma, z, theta), body_mask, tail_mask, TAIL)
        if row + 2 < num_s:  # row + 3 >= 0 always
            rad, x = bm_prepare(r2, r3, MATH)
            ptr += 2 * row_stride
            if row + 2 >= 0:
                _store_row(ptr, offs, tl.fma(sigma, bm_cos(rad, x, MATH), theta), body_mask, tail_mask, TAIL)
            if row + 3 < num_s:
                z = bm_sin(rad, x, MATH)
                _store_row(ptr + row_stride, offs, tl.fma(sigma, z, theta), body_mask, tail_mask, TAIL)
