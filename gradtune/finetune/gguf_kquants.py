"""llama.cpp's K-quants Q4_K, Q5_K and Q6_K, written in numpy, vectorised over blocks.

    raw = gguf_kquants.quantize(w, "q4_k")  # w: float32 (rows, cols), cols % 256 == 0
    raw.shape                                 # (rows, cols // 256 * 144), uint8: GGUF's tensor bytes

The ``gguf`` package dequantizes these types but cannot write them; llama.cpp's
``llama-quantize`` can. This module follows llama.cpp's reference quantizers (the ones
``llama-quantize`` runs when given no importance matrix), block for block:

  * a super-block is 256 consecutive values of a row;
  * Q4_K / Q5_K (``quantize_row_q4_K_ref`` / ``_q5_K_ref``): 8 sub-blocks of 32 values, each
    ``x ~ scale * q - min`` with q in 0..15 (0..31); each sub-block's (scale, min) is the best
    of a small grid of candidate scales, each refitted by weighted least squares with weights
    ``rms(sub-block) + |x|`` (``make_qkx2_quants``); the 8 scales and 8 mins are then stored as
    6-bit multiples of two fp16 super-block factors d and dmin, and q is recomputed from the
    stored (rounded) values. Bytes: d, dmin (fp16), 12 bytes of packed 6-bit scales and mins,
    [Q5_K: 32 bytes of 5th bits], 128 bytes of 4-bit q (two sub-blocks per 32 bytes);
  * Q6_K (``quantize_row_q6_K_ref``): 16 sub-blocks of 16 values, ``x ~ scale * q`` with q in
    -32..31; each sub-block's scale is the best of 19 candidates by the x^2-weighted
    least-squares fit (``make_qx_quants``); the 16 scales are stored as int8 multiples of one fp16
    d. Bytes: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d (fp16).

All arithmetic is float32 as in C; round-to-nearest-even (``np.rint``) is C's ``nearest_int``.
Two departures, neither changing a dequantized value: a sub-block whose stored scale is 0 gets
the code of 0 (llama.cpp leaves the search's q there, which the zero scale multiplies away), and
a negative Q4_K/Q5_K scale (possible only in degenerate sub-blocks) is stored as 0, not wrapped.
"""

from __future__ import annotations

import numpy as np

QK = 256  # values per super-block (gguf.QK_K)
BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}  # bytes per super-block (gguf.GGML_QUANT_SIZES)
CHUNK = 1024  # super-blocks quantised at once: each temporary (Q6_K's (16n, 19, 16) float32) stays ~20 MB
# make_qkx2_quants' candidate grid per type: (nmax, rmin, rdelta, nstep), as the reference calls it
QKX2 = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}
GROUP_MAX_EPS = 1e-15  # below this |x| a Q6_K sub-block / super-block counts as all zero


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    """float32 ``w`` (rows, cols), cols a multiple of 256, as ``kind``'s bytes (rows, cols/256*size)."""
    rows, cols = w.shape
    if cols % QK:
        raise ValueError(f"{kind}: rows of {cols} values are not whole {QK}-value super-blocks")
    blocks = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, QK)
    fn = _q6_k if kind == "q6_k" else _q45_k
    out = np.concatenate([fn(blocks[i : i + CHUNK], kind) for i in range(0, len(blocks), CHUNK)])
    return out.reshape(rows, cols // QK * BYTES[kind])


def _fit_scale_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qkx2_quants (squared error) for every sub-block at once: x (n, 32) -> (scale, min),
    both (n,), x ~ scale * q - min with q in 0..nmax, min >= 0. The candidates are tried in
    the reference's order because each one's grid starts from the best offset found so far."""
    w = np.sqrt((x * x).mean(axis=1, keepdims=True)) + np.abs(x)  # (n, 32) importance of each value
    lo = np.minimum(x.min(axis=1), 0)[:, None]  # (n, 1): the offset is never above 0
    hi = x.max(axis=1)[:, None]
    flat = (hi == lo)[:, 0]
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    # the first guess: the range split into nmax steps
    span = np.where(flat[:, None], 1, hi - lo)
    scale = (span / nmax)[:, 0]
    q = np.clip(np.rint((nmax / span) * (x - lo)), 0, nmax)
    best = (w * np.square(scale[:, None] * q + lo - x)).sum(axis=1)
    for k in range(nstep + 1):  # inverse scale (nmax + rmin + rdelta k) / (max - offset), refitted
        span = np.where(flat[:, None], 1, hi - lo)
        q = np.multiply((np.float32(rmin + rdelta * k) + nmax) / span, x - lo)
        np.clip(np.rint(q, out=q), 0, nmax, out=q)
        wq = w * q
        s_l, s_l2, s_xl = wq.sum(axis=1), (wq * q).sum(axis=1), (wq * x).sum(axis=1)
        det = sum_w * s_l2 - s_l * s_l
        ok = det > 0
        det = np.where(ok, det, 1)
        fit = (sum_w * s_xl - sum_x * s_l) / det
        off = (s_l2 * sum_x - s_l * s_xl) / det
        pos = off > 0  # an offset above 0 is not storable: refit the scale alone
        fit = np.where(pos, s_xl / np.where(s_l2 > 0, s_l2, 1), fit)
        off = np.where(pos, 0, off)
        q *= fit[:, None]
        q += off[:, None]
        q -= x
        err = (w * np.square(q, out=q)).sum(axis=1)  # q now holds the residuals
        take = ok & (err < best)
        best = np.where(take, err, best)
        scale = np.where(take, fit, scale)
        lo = np.where(take[:, None], off[:, None], lo)
    return np.where(flat, 0, scale).astype(np.float32), (-lo[:, 0]).astype(np.float32)


def _six_bits(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-super-block values v (n, 8) >= 0 as 6-bit levels (n, 8) times one fp16 factor (n,)."""
    top = np.maximum(v.max(axis=1), 0)
    inv = np.where(top > 0, 63 / np.where(top > 0, top, 1), 0).astype(np.float32)
    levels = np.clip(np.rint(inv[:, None] * v), 0, 63).astype(np.uint8)
    return levels, (top / 63).astype(np.float16)


def _q45_k(blocks: np.ndarray, kind: str) -> np.ndarray:
    """Q4_K / Q5_K bytes (n, 144 / 176) of float32 super-blocks (n, 256)."""
    n = len(blocks)
    nmax, rmin, rdelta, nstep = QKX2[kind]
    x = blocks.reshape(n * 8, 32)
    scale, mins = _fit_scale_min(x, nmax, rmin, rdelta, nstep)
    ls, d = _six_bits(scale.reshape(n, 8))
    lm, dmin = _six_bits(mins.reshape(n, 8))
    # q recomputed from the stored values: x ~ (d * ls) * q - (dmin * lm)
    sc = (d.astype(np.float32)[:, None] * ls).reshape(-1, 1)
    mn = (dmin.astype(np.float32)[:, None] * lm).reshape(-1, 1)
    q = np.clip(np.rint((x + mn) / np.where(sc > 0, sc, 1)), 0, nmax)
    q = np.where(sc > 0, q, 0).astype(np.uint8).reshape(n, 4, 2, 32)  # (pairs of sub-blocks, 32)
    # 12 scale bytes: 0-3 scales 0-3 (+ top 2 bits of scales 4-7), 4-7 mins 0-3 (+ top bits of
    # mins 4-7), 8-11 low 4 bits of scales 4-7 | low 4 bits of mins 4-7 << 4
    packed = np.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    )
    low = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)  # (n, 4, 32): sub-blocks 2k, 2k+1 share bytes
    parts = [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed]
    if kind == "q5_k":  # byte j's bit i: the 5th bit of value j of sub-block i
        high = (q.reshape(n, 8, 32) >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]
        parts.append(np.bitwise_or.reduce(high, axis=1).astype(np.uint8))
    parts.append(low.reshape(n, 128))
    return np.concatenate(parts, axis=1)


def _fit_scale_sym(x: np.ndarray, nmax: int) -> np.ndarray:
    """make_qx_quants (x^2-weighted): x (n, 16) -> scale (n,), x ~ scale * q, q in -nmax..nmax-1."""
    i = np.abs(x).argmax(axis=1)
    peak = x[np.arange(len(x)), i][:, None]  # (n, 1) the value of largest magnitude, signed
    zero = np.abs(peak[:, 0]) < GROUP_MAX_EPS
    peak = np.where(zero[:, None], 1, peak)
    # candidates: -(nmax + 0.1 k) / peak for k = 0, -9..-1, 1..9, k = 0 first as the reference tries it
    steps = np.array([0] + list(range(-9, 0)) + list(range(1, 10)), dtype=np.float32)
    isc = -(nmax + np.float32(0.1) * steps)[None, :, None] / peak[:, :, None]  # (n, 19, 1)
    q = np.clip(np.rint(isc * x[:, None, :]), -nmax, nmax - 1)  # (n, 19, 16)
    w = (x * x)[:, None, :]
    s_lx, s_l2 = (w * x[:, None, :] * q).sum(axis=2), (w * q * q).sum(axis=2)
    good = s_l2 > 0
    fit = np.where(good, s_lx * s_lx / np.where(good, s_l2, 1), -np.inf)  # reduction of squared error
    fit[:, 0] = np.where(good[:, 0], fit[:, 0], 0)
    k = fit.argmax(axis=1)  # the first best, as the reference's strict ">" keeps
    rows = np.arange(len(x))
    scale = np.where(good[rows, k], s_lx[rows, k] / np.where(good[rows, k], s_l2[rows, k], 1), 0)
    return np.where(zero, 0, scale).astype(np.float32)


def _q6_k(blocks: np.ndarray, kind: str) -> np.ndarray:
    """Q6_K bytes (n, 210) of float32 super-blocks (n, 256)."""
    n = len(blocks)
    x = blocks.reshape(n, 16, 16)
    scale = _fit_scale_sym(x.reshape(-1, 16), 32).reshape(n, 16)
    top = scale[np.arange(n), np.abs(scale).argmax(axis=1)]  # (n,) signed scale of largest magnitude
    zero = np.abs(top) < GROUP_MAX_EPS
    iscale = np.where(zero, 0, -128 / np.where(zero, 1, top)).astype(np.float32)
    d = np.where(zero, 0, 1 / np.where(zero, 1, iscale)).astype(np.float16)
    ls = np.clip(np.rint(iscale[:, None] * scale), -128, 127).astype(np.int8)  # (n, 16)
    sub = d.astype(np.float32)[:, None] * ls  # (n, 16) each sub-block's stored scale
    q = np.clip(np.rint(x / np.where(sub != 0, sub, 1)[:, :, None]), -32, 31)
    q = (np.where(sub[:, :, None] != 0, q, 0) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    # per half of 128 values: 64 bytes of low nibbles (quarters 0|2 and 1|3), 32 of high 2-bit pairs
    low = np.stack([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], 2)
    high = np.bitwise_or.reduce((q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None], axis=2)
    parts = [low.reshape(n, 128), high.astype(np.uint8).reshape(n, 64), ls.view(np.uint8), d.view(np.uint8)[:, None]]
    out = np.concatenate([p.reshape(n, -1) for p in parts], axis=1)
    out[zero] = 0  # an all-zero super-block is all zero bytes, as the reference writes it
    return out
