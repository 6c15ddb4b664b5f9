"""K-quants written by gguf_kquants: the layout is checked by the gguf package's own dequantizers
(the oracle: what llama.cpp and transformers read), the quantisation by a plain per-block
transliteration of llama.cpp's reference quantizers below, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from gradtune.finetune import gguf_kquants

gguf = pytest.importorskip("gguf")

# relative RMS error (||dequant - w|| / ||w||) on standard-normal weights (256 x 1024, seed 0),
# measured: q4_k 0.0715, q5_k 0.0362, q6_k 0.0178 (q4_1 0.0783, q5_1 0.0379, q8_0 0.0054);
# asserted at about 1.5x
BOUND = {"q4_k": 0.108, "q5_k": 0.055, "q6_k": 0.027}
LEGACY = {"q4_k": "Q4_1", "q5_k": "Q5_1", "q6_k": "Q8_0"}  # the block type of the next size around


def rel_rms(back: np.ndarray, w: np.ndarray) -> float:
    return float(np.sqrt(np.square(back - w).mean() / np.square(w).mean()))


def dequant(raw: np.ndarray, kind: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind.upper()])


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_round_trip_through_ggufs_dequantizer_within_the_types_error(kind):
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    raw = gguf_kquants.quantize(w, kind)
    assert raw.dtype == np.uint8 and raw.shape == (256, 4 * gguf_kquants.BYTES[kind])
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]] == (256, gguf_kquants.BYTES[kind])
    err = rel_rms(dequant(raw, kind), w)
    legacy = gguf.GGMLQuantizationType[LEGACY[kind]]
    old = rel_rms(gguf.quants.dequantize(gguf.quants.quantize(w, legacy), legacy), w)
    print(f"{kind}: relative RMS error {err:.4f} ({LEGACY[kind]}: {old:.4f})")
    assert 0 < err < BOUND[kind]
    if kind != "q6_k":  # same bits per value as the _1 type or fewer, and a smaller error
        assert err < old


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_degenerate_blocks_stay_finite_and_exact_where_they_can(kind):
    w = np.zeros((6, 256), np.float32)
    w[1] = 3.0  # constant, all positive
    w[2] = -2.5  # constant, all negative
    w[3, 7] = 1.0  # one non-zero value
    w[4] = np.linspace(0.5, 1.5, 256)  # all positive: the min is 0
    w[5] = 1e-30  # below the reference's zero threshold for Q6_K
    raw = gguf_kquants.quantize(w, kind)
    np.testing.assert_array_equal(raw[0], 0)  # an all-zero row is all zero bytes, as llama.cpp writes it
    back = dequant(raw, kind)
    assert np.isfinite(back).all()
    np.testing.assert_array_equal(back[0], 0)
    np.testing.assert_allclose(back[:4], w[:4], atol=0.02 * 3)
    assert rel_rms(back[4], w[4]) < BOUND[kind]


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ValueError, match="256"):
        gguf_kquants.quantize(np.zeros((2, 288), np.float32), "q4_k")


# --- llama.cpp's reference quantizers, one block at a time (quantize_row_q{4,5,6}_K_ref) ---


def f16(v: float) -> float:
    return float(np.float32(np.float16(v)))


def ref_qkx2(x, nmax, rmin, rdelta, nstep):
    w = np.sqrt(np.mean(x * x)) + np.abs(x)
    lo, hi = min(float(x.min()), 0.0), float(x.max())
    if hi == lo:
        return 0.0, -lo
    sum_w, sum_x = w.sum(), (w * x).sum()
    iscale = nmax / (hi - lo)
    scale = 1 / iscale
    q = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    best = (w * (scale * q + lo - x) ** 2).sum()
    for k in range(nstep + 1):
        q = np.clip(np.rint((rmin + rdelta * k + nmax) / (hi - lo) * (x - lo)), 0, nmax)
        s_l, s_l2, s_xl = (w * q).sum(), (w * q * q).sum(), (w * q * x).sum()
        det = sum_w * s_l2 - s_l * s_l
        if det > 0:
            this_scale, this_min = (sum_w * s_xl - sum_x * s_l) / det, (s_l2 * sum_x - s_l * s_xl) / det
            if this_min > 0:
                this_min, this_scale = 0.0, s_xl / s_l2
            err = (w * (this_scale * q + this_min - x) ** 2).sum()
            if err < best:
                best, scale, lo = err, this_scale, this_min
    return scale, -lo


def ref_q45_k(x, kind):
    nmax, rmin, rdelta, nstep = gguf_kquants.QKX2[kind]
    fits = [ref_qkx2(x[32 * j : 32 * j + 32], nmax, rmin, rdelta, nstep) for j in range(8)]
    scales, mins = np.array([f[0] for f in fits]), np.array([f[1] for f in fits])
    ms, mm = max(scales.max(), 0), max(mins.max(), 0)
    ls = [min(63, int(np.rint(63 / ms * s))) if ms > 0 else 0 for s in scales]
    lm = [min(63, int(np.rint(63 / mm * m))) if mm > 0 else 0 for m in mins]
    d, dmin = f16(ms / 63), f16(mm / 63)
    sc = bytearray(12)
    for j in range(8):
        if j < 4:
            sc[j], sc[j + 4] = ls[j], lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6
    q = np.zeros(256, np.int64)
    for j in range(8):
        if d * ls[j]:
            q[32 * j : 32 * j + 32] = np.clip(np.rint((x[32 * j : 32 * j + 32] + dmin * lm[j]) / (d * ls[j])), 0, nmax)
    qs, qh = bytearray(128), bytearray(32)
    for n in range(4):
        for j in range(32):
            lo, hi = q[64 * n + j], q[64 * n + 32 + j]
            qh[j] |= (lo > 15) << (2 * n) | (hi > 15) << (2 * n + 1)
            qs[32 * n + j] = (lo & 0xF) | ((hi & 0xF) << 4)
    head = np.float16(ms / 63).tobytes() + np.float16(mm / 63).tobytes() + bytes(sc)
    return head + (bytes(qh) if kind == "q5_k" else b"") + bytes(qs)


def ref_qx(x, nmax):
    peak = x[np.abs(x).argmax()]
    if abs(peak) < 1e-15:
        return 0.0
    best, scale = None, 0.0
    for k in [0] + [k for k in range(-9, 10) if k]:
        q = np.clip(np.rint(-(nmax + 0.1 * k) / peak * x), -nmax, nmax - 1)
        s_lx, s_l2 = (x * x * x * q).sum(), (x * x * q * q).sum()
        if best is None:
            scale = s_lx / s_l2 if s_l2 else 0.0
            best = scale * s_lx
        elif s_l2 > 0 and s_lx * s_lx > best * s_l2:
            scale = s_lx / s_l2
            best = scale * s_lx
    return scale


def ref_q6_k(x):
    scales = np.array([ref_qx(x[16 * j : 16 * j + 16], 32) for j in range(16)])
    top = scales[np.abs(scales).argmax()]
    if abs(top) < 1e-15:
        return bytes(210)
    iscale = -128 / top
    d = f16(1 / iscale)
    ls = [min(127, int(np.rint(iscale * s))) for s in scales]
    q = np.full(256, 32, np.int64)
    for j in range(16):
        if d * ls[j]:
            q[16 * j : 16 * j + 16] = np.clip(np.rint(x[16 * j : 16 * j + 16] / (d * ls[j])), -32, 31) + 32
    ql, qh = bytearray(128), bytearray(64)
    for h in range(2):
        for j in range(32):
            a, b, c, e = (q[128 * h + 32 * k + j] for k in range(4))
            ql[64 * h + j] = (a & 0xF) | ((c & 0xF) << 4)
            ql[64 * h + 32 + j] = (b & 0xF) | ((e & 0xF) << 4)
            qh[32 * h + j] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    return bytes(ql) + bytes(qh) + np.array(ls, np.int8).tobytes() + np.float16(1 / iscale).tobytes()


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_blocks_match_llama_cpps_reference_quantizer(kind):
    """In float64 the vectorised blocks are the reference's, byte for byte. In float32 (what the
    export runs) a sum in another order than C's can tip a near-tie between candidate scales in
    a few blocks: the whole tensor's error then stays within 1% of the reference's."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 1024)) * rng.uniform(0.01, 2, (8, 1))).astype(np.float32)
    w[0, :256] += 0.5  # a shifted block: the mins matter
    blocks = w.reshape(-1, 256).astype(np.float64)
    ref = np.array([np.frombuffer(ref_q6_k(b) if kind == "q6_k" else ref_q45_k(b, kind), np.uint8) for b in blocks])
    exact = gguf_kquants._q6_k(blocks, kind) if kind == "q6_k" else gguf_kquants._q45_k(blocks, kind)
    np.testing.assert_array_equal(exact, ref)
    ours = gguf_kquants.quantize(w, kind).reshape(-1, gguf_kquants.BYTES[kind])
    same = (ours == ref).all(axis=1).mean()
    err, ref_err = rel_rms(dequant(ours, kind), blocks), rel_rms(dequant(ref, kind), blocks)
    print(f"{kind}: float32 {same:.0%} of blocks byte-identical, error {err:.5f} (reference {ref_err:.5f})")
    assert same >= 0.7 and err < 1.01 * ref_err


@pytest.mark.parametrize("kind", ["q4_k", "q6_k"])
def test_blocks_are_independent_across_chunks(kind):
    w = np.random.default_rng(2).standard_normal((gguf_kquants.CHUNK + 76, 256)).astype(np.float32)
    parts = np.concatenate([gguf_kquants.quantize(w[:500], kind), gguf_kquants.quantize(w[500:], kind)])
    np.testing.assert_array_equal(gguf_kquants.quantize(w, kind), parts)
