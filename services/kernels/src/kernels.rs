//! CPU kernels of the native engines (the generator's LLM, the embedders' MiniLM): an int8 GEMM
//! over Q8_0 weights repacked for AVX-512 VNNI, activation quantization, and the f16 key/value
//! dot products of attention.
//!
//! Most of the project's `unsafe` code lives here: SIMD intrinsics (selected at run time
//! with `is_x86_feature_detected!`, with a portable fallback) and the disjoint column writes of
//! the parallel GEMM.
//!
//! Determinism: every output element is computed by the same sequence of operations whatever
//! the number of rows in the batch or the tile it falls in (integer block dot, one conversion,
//! one multiply of the two scales, one fused multiply-add per 32-wide block, blocks in order).
//! So a row's result does not depend on what else is in the batch: batched, chunked and
//! prefix-cached runs give bit-identical logits.
#![allow(unsafe_code)]

use half::f16;

/// Calls `$f::<N>(args)` for `N` = `$n` in 1..=12 (12 for anything larger): the attention
/// kernels' vector counts as compile-time constants, so their accumulators stay in registers.
macro_rules! with_rows {
    ($n:expr, $f:ident, ($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            _ => $f::<12>($($arg),*),
        }
    };
}

/// Dot product of two f32 slices in 16 independent lanes (so the compiler vectorizes it).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rows of the weight matrix packed together (one AVX-512 register of outputs).
pub const NR: usize = 16;
/// Quantization block (Q8_0).
pub const QK: usize = 32;

/// A weight matrix `W[n][k]` in Q8_0 (per 32-wide block: one f16 scale and 32 quants, 34 bytes
/// as in GGUF), repacked in groups of 16 rows so that one 512-bit load holds 4 quants of each
/// of 16 rows. Quants are stored offset by 128 (unsigned, VNNI's first operand); the offset's
/// contribution, 128 × the activation block's sum, is subtracted per activation block.
pub struct QMatrix {
    /// Output features (rows of W).
    pub n: usize,
    /// Input features (multiple of 32).
    pub k: usize,
    groups: usize,
    /// `[group][kb][quad 0..8][row 0..16][4]`, `w + 128`.
    qs: Vec<u8>,
    /// `[group][kb][row]` scales.
    d: Vec<f16>,
}

impl QMatrix {
    /// Builds from Q8_0 blocks: `scales[row][kb]`, `quants[row][k]`.
    pub fn from_q8(n: usize, k: usize, scales: &[f32], quants: &[i8]) -> Self {
        assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
        let kbs = k / QK;
        assert_eq!(scales.len(), n * kbs);
        assert_eq!(quants.len(), n * k);
        let groups = n.div_ceil(NR);
        let mut qs = vec![128u8; groups * kbs * QK * NR];
        let mut d = vec![f16::ZERO; groups * kbs * NR];
        for row in 0..n {
            let (g, r) = (row / NR, row % NR);
            for kb in 0..kbs {
                let base = (g * kbs + kb) * QK * NR;
                for q in 0..QK / 4 {
                    for b in 0..4 {
                        let v = quants[row * k + kb * QK + q * 4 + b];
                        qs[base + q * 4 * NR + r * 4 + b] = (v as i16 + 128) as u8;
                    }
                }
                d[(g * kbs + kb) * NR + r] = f16::from_f32(scales[row * kbs + kb]);
            }
        }
        Self {
            n,
            k,
            groups,
            qs,
            d,
        }
    }

    /// Quantizes f32 rows `w[n][k]` to Q8_0 and packs them.
    pub fn from_f32(n: usize, k: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), n * k);
        let kbs = k / QK;
        let mut scales = vec![0f32; n * kbs];
        let mut quants = vec![0i8; n * k];
        for row in 0..n {
            for kb in 0..kbs {
                let x = &w[row * k + kb * QK..row * k + (kb + 1) * QK];
                let (s, q) = quantize_block(x);
                scales[row * kbs + kb] = s;
                for (dst, v) in quants[row * k + kb * QK..].iter_mut().zip(q) {
                    *dst = v;
                }
            }
        }
        Self::from_q8(n, k, &scales, &quants)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * self.d.len()
    }
}

/// Q8_0 quantization of one 32-wide block: scale and quants (round half to even, as the
/// vector path does).
pub fn quantize_block(x: &[f32]) -> (f32, [i8; QK]) {
    let mut q = [0i8; QK];
    #[cfg(target_arch = "x86_64")]
    if has_vnni() && x.len() == QK {
        // SAFETY: 32 elements; the CPU has AVX-512F/BW.
        let d = unsafe { quantize_block_avx512(x, &mut q) };
        return (d, q);
    }
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return (0.0, q);
    }
    let d = amax / 127.0;
    let inv = 1.0 / d;
    for (dst, v) in q.iter_mut().zip(x) {
        *dst = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    (d, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8; QK]) -> f32 {
    use std::arch::x86_64::*;
    let a = unsafe { _mm512_loadu_ps(x.as_ptr()) };
    let b = unsafe { _mm512_loadu_ps(x.as_ptr().add(16)) };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    if amax == 0.0 {
        return 0.0;
    }
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(1.0 / d);
    let lim = _mm512_set1_ps(127.0);
    let qa = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_mul_ps(a, inv), lim));
    let qb = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_mul_ps(b, inv), lim));
    unsafe {
        _mm_storeu_si128(q.as_mut_ptr() as *mut _, _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut _, _mm512_cvtepi32_epi8(qb));
    }
    d
}

/// Activations quantized per row and 32-wide block (signed quants, f32 scale), with each
/// block's `128 × Σ quants` (what the weights' +128 offset adds to a block dot product).
#[derive(Default)]
pub struct QActs {
    m: usize,
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    corr: Vec<i32>,
}

impl QActs {
    /// Quantizes `x[m][k]` (reusing this buffer); the tests' reference for [`Self::fill`].
    #[cfg(test)]
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        debug_assert_eq!(x.len(), m * k);
        let kbs = k / QK;
        self.m = m;
        self.k = k;
        self.q.resize(m * k, 0);
        self.d.resize(m * kbs, 0.0);
        self.corr.resize(m * kbs, 0);
        quantize_into(x, &mut self.q, &mut self.d, &mut self.corr);
    }

    /// Quantizes `m` rows of width `k` that `row(r, buf)` writes into `buf`, spreading the rows
    /// over the pool when there are enough of them (the row producer — a norm, an activation —
    /// then runs in parallel too, and its f32 output never leaves the thread's cache).
    pub fn fill(
        &mut self,
        pool: &crate::pool::Pool,
        m: usize,
        k: usize,
        row: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        let kbs = k / QK;
        self.m = m;
        self.k = k;
        self.q.resize(m * k, 0);
        self.d.resize(m * kbs, 0.0);
        self.corr.resize(m * kbs, 0);
        // About 16K elements per task: big enough to pay for the hand-off.
        let per = (16_384 / k.max(1)).max(1);
        let tasks = m.div_ceil(per);
        let (q, d, c) = (
            SendPtr(self.q.as_mut_ptr()),
            SendPtr(self.d.as_mut_ptr()),
            SendPtr(self.corr.as_mut_ptr()),
        );
        let work = |task: usize| {
            let (q, d, c) = (q, d, c);
            ROW.with_borrow_mut(|buf| {
                buf.resize(k, 0.0);
                for r in task * per..((task + 1) * per).min(m) {
                    row(r, buf);
                    // SAFETY: row r owns quants [r·k, (r+1)·k) and blocks [r·kbs, (r+1)·kbs)
                    // of buffers sized above; tasks cover disjoint rows.
                    let (qs, ds, cs) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(q.0.add(r * k), k),
                            std::slice::from_raw_parts_mut(d.0.add(r * kbs), kbs),
                            std::slice::from_raw_parts_mut(c.0.add(r * kbs), kbs),
                        )
                    };
                    quantize_into(buf, qs, ds, cs);
                }
            });
        };
        if tasks == 1 {
            work(0);
        } else {
            pool.run(tasks, &work);
        }
    }
}

/// Quantizes `x` block by block into quants, scales and `128 × Σ quants` corrections.
fn quantize_into(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    for (((xs, qb), dv), cv) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(d.iter_mut())
        .zip(corr.iter_mut())
    {
        let (s, qv) = quantize_block(xs);
        *dv = s;
        qb.copy_from_slice(&qv);
        *cv = 128 * qv.iter().map(|&v| v as i32).sum::<i32>();
    }
}

thread_local! {
    /// One f32 row for [`QActs::fill`].
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: used only to hand out disjoint row ranges (see `QActs::fill`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the GEMM writes disjoint column ranges of the output from different threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Forces the portable kernels (tests compare them with the vector ones).
static PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn has_vnni() -> bool {
    use std::sync::OnceLock;
    if PORTABLE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Which GEMM kernel this machine runs.
pub fn kernel_name() -> &'static str {
    if has_vnni() {
        "avx512-vnni int8"
    } else {
        "portable int8"
    }
}

/// `out[m][w.n] = x · Wᵀ`, split over `pool`'s threads by groups of 16 output columns.
pub fn gemm(pool: &crate::pool::Pool, x: &QActs, w: &QMatrix, out: &mut [f32]) {
    assert_eq!(x.k, w.k, "inner dimensions differ");
    let m = x.m;
    assert!(out.len() >= m * w.n);
    if m == 0 {
        return;
    }
    let threads = pool.threads();
    let work = m * w.n * w.k;
    // Small products run on the calling thread; larger ones in a few chunks per thread.
    let chunks = if work < 1 << 18 {
        1
    } else {
        (threads * 4).min(w.groups)
    };
    let per = w.groups.div_ceil(chunks);
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |c: usize| {
        let g0 = c * per;
        let g1 = ((c + 1) * per).min(w.groups);
        let p = ptr;
        for g in g0..g1 {
            // SAFETY: group g writes only columns g*16..g*16+16 of every row, within `out`.
            unsafe { gemm_group(x, w, g, p.0) };
        }
    };
    pool.run(chunks, &run);
}

/// One tile's operands: rows of quantized activations against one group of 16 weight rows.
#[derive(Clone, Copy)]
struct Tile {
    xq: *const i8,
    k: usize,
    xd: *const f32,
    xc: *const i32,
    kbs: usize,
    wq: *const u8,
    wd: *const f16,
    out: *mut f32,
    ldo: usize,
    ncols: usize,
}

/// All rows of `x` against weight group `g`, written to `out` (row stride `w.n`).
unsafe fn gemm_group(x: &QActs, w: &QMatrix, g: usize, out: *mut f32) {
    let kbs = w.k / QK;
    let ncols = (w.n - g * NR).min(NR);
    let wq = unsafe { w.qs.as_ptr().add(g * kbs * QK * NR) };
    let wd = unsafe { w.d.as_ptr().add(g * kbs * NR) };
    let mut i = 0;
    const MR: usize = 8;
    while i < x.m {
        let rows = (x.m - i).min(MR);
        let xq = unsafe { x.q.as_ptr().add(i * w.k) };
        let xd = unsafe { x.d.as_ptr().add(i * kbs) };
        let xc = unsafe { x.corr.as_ptr().add(i * kbs) };
        let t = Tile {
            xq,
            k: w.k,
            xd,
            xc,
            kbs,
            wq,
            wd,
            out: unsafe { out.add(i * w.n + g * NR) },
            ldo: w.n,
            ncols,
        };
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if has_vnni() {
                match rows {
                    8 => tile_vnni::<8>(t),
                    7 => tile_vnni::<7>(t),
                    6 => tile_vnni::<6>(t),
                    5 => tile_vnni::<5>(t),
                    4 => tile_vnni::<4>(t),
                    3 => tile_vnni::<3>(t),
                    2 => tile_vnni::<2>(t),
                    _ => tile_vnni::<1>(t),
                }
                i += rows;
                continue;
            }
            tile_portable(rows, t);
        }
        i += rows;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const MR: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let Tile {
        xq,
        k,
        xd,
        xc,
        kbs,
        wq,
        wd,
        out,
        ldo,
        ncols,
    } = t;
    let mut acc = [_mm512_setzero_ps(); MR];
    for kb in 0..kbs {
        let wb = unsafe { wq.add(kb * QK * NR) };
        let w: [__m512i; 8] =
            std::array::from_fn(|q| unsafe { _mm512_loadu_si512(wb.add(q * 64) as *const _) });
        let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(wd.add(kb * NR) as *const _) });
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = unsafe { xq.add(i * k + kb * QK) } as *const i32;
            let mut s = _mm512_setzero_si512();
            for (q, wv) in w.iter().enumerate() {
                let xv = _mm512_set1_epi32(unsafe { xb.add(q).read_unaligned() });
                s = _mm512_dpbusd_epi32(s, *wv, xv);
            }
            let s = _mm512_sub_epi32(s, _mm512_set1_epi32(unsafe { *xc.add(i * kbs + kb) }));
            let f = _mm512_cvtepi32_ps(s);
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(unsafe { *xd.add(i * kbs + kb) }));
            *a = _mm512_fmadd_ps(f, scale, *a);
        }
    }
    let mask: __mmask16 = if ncols >= 16 {
        0xffff
    } else {
        ((1u32 << ncols) - 1) as u16
    };
    for (i, a) in acc.iter().enumerate() {
        unsafe { _mm512_mask_storeu_ps(out.add(i * ldo), mask, *a) };
    }
}

unsafe fn tile_portable(rows: usize, t: Tile) {
    let Tile {
        xq,
        k,
        xd,
        xc,
        kbs,
        wq,
        wd,
        out,
        ldo,
        ncols,
    } = t;
    for i in 0..rows {
        let mut acc = [0f32; NR];
        for kb in 0..kbs {
            let mut s = [0i32; NR];
            for q in 0..QK / 4 {
                for (r, sr) in s.iter_mut().enumerate() {
                    for b in 0..4 {
                        let xv = unsafe { *xq.add(i * k + kb * QK + q * 4 + b) } as i32;
                        let wv = unsafe { *wq.add(kb * QK * NR + q * 4 * NR + r * 4 + b) } as i32;
                        *sr += xv * wv;
                    }
                }
            }
            let dx = unsafe { *xd.add(i * kbs + kb) };
            let c = unsafe { *xc.add(i * kbs + kb) };
            for (r, a) in acc.iter_mut().enumerate() {
                let f = (s[r] - c) as f32;
                let scale = unsafe { (*wd.add(kb * NR + r)).to_f32() } * dx;
                *a = f.mul_add(scale, *a);
            }
        }
        for (r, a) in acc.iter().enumerate().take(ncols) {
            unsafe { *out.add(i * ldo + r) = *a };
        }
    }
}

/// `Σ a[i]·b[i]` with `b` in f16 (`a.len() == b.len()`, a multiple of 16).
#[inline]
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_vnni() && a.len().is_multiple_of(16) {
        // SAFETY: lengths checked; the CPU has AVX-512F.
        return unsafe { dot_f16_avx512(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f16_avx512(a: &[f32], b: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    for i in (0..a.len()).step_by(16) {
        let av = unsafe { _mm512_loadu_ps(a.as_ptr().add(i)) };
        let bv = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(b.as_ptr().add(i) as *const _) });
        acc = _mm512_fmadd_ps(av, bv, acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// `y += a · x` with `x` in f16 (`y.len() == x.len()`, a multiple of 16).
#[inline]
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    debug_assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_vnni() && y.len().is_multiple_of(16) {
        // SAFETY: lengths checked; the CPU has AVX-512F.
        unsafe { axpy_f16_avx512(y, a, x) };
        return;
    }
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = xv.to_f32().mul_add(a, *yv);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_f16_avx512(y: &mut [f32], a: f32, x: &[f16]) {
    use std::arch::x86_64::*;
    let av = _mm512_set1_ps(a);
    for i in (0..y.len()).step_by(16) {
        let yp = unsafe { y.as_mut_ptr().add(i) };
        let xv = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(x.as_ptr().add(i) as *const _) });
        unsafe { _mm512_storeu_ps(yp, _mm512_fmadd_ps(xv, av, _mm512_loadu_ps(yp))) };
    }
}

/// Attention scores of 16 keys for `rows` query vectors (the heads of a kv group, for one or
/// several tokens): `out[r·stride + j] = q_r · k_j` for `j < 16`, where `kt` holds the keys
/// transposed (`kt[d·kstride + j]` = dimension `d` of key `j`), so 16 scores come out of one
/// vector without a horizontal sum.
///
/// Each score is two fused multiply-add chains, over the even and the odd dimensions, added at
/// the end: two chains per vector keep the FMA units busy when few vectors share the keys (one
/// decoding token), and up to 12 vectors go through in one pass, so a tile of prompt tokens
/// converts each key vector once for all of them. The chains of a vector are the same whatever
/// the other vectors, so a token's scores do not depend on its tile.
pub fn scores16(
    q: &[f32],
    rows: usize,
    hd: usize,
    kt: &[f16],
    kstride: usize,
    out: &mut [f32],
    stride: usize,
) {
    assert!(hd.is_multiple_of(2));
    assert!(kt.len() >= (hd - 1) * kstride + 16 && q.len() >= rows * hd);
    assert!(rows == 0 || out.len() >= (rows - 1) * stride + 16);
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(12);
            let (q, out) = (&q[r0 * hd..], &mut out[r0 * stride..]);
            // SAFETY: lengths asserted above; the CPU has AVX-512F.
            unsafe { with_rows!(n, scores16_avx512, (q, hd, kt, kstride, out, stride)) }
            r0 += n;
        }
        return;
    }
    for r in 0..rows {
        for j in 0..16 {
            let (mut even, mut odd) = (0f32, 0f32);
            for d in (0..hd).step_by(2) {
                even = q[r * hd + d].mul_add(kt[d * kstride + j].to_f32(), even);
                odd = q[r * hd + d + 1].mul_add(kt[(d + 1) * kstride + j].to_f32(), odd);
            }
            out[r * stride + j] = even + odd;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores16_avx512<const ROWS: usize>(
    q: &[f32],
    hd: usize,
    kt: &[f16],
    kstride: usize,
    out: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let mut even = [_mm512_setzero_ps(); ROWS];
    let mut odd = [_mm512_setzero_ps(); ROWS];
    for d in (0..hd).step_by(2) {
        let k0 = _mm512_cvtph_ps(unsafe {
            _mm256_loadu_si256(kt.as_ptr().add(d * kstride) as *const _)
        });
        let k1 = _mm512_cvtph_ps(unsafe {
            _mm256_loadu_si256(kt.as_ptr().add((d + 1) * kstride) as *const _)
        });
        for r in 0..ROWS {
            let q0 = _mm512_set1_ps(unsafe { *q.get_unchecked(r * hd + d) });
            let q1 = _mm512_set1_ps(unsafe { *q.get_unchecked(r * hd + d + 1) });
            even[r] = _mm512_fmadd_ps(q0, k0, even[r]);
            odd[r] = _mm512_fmadd_ps(q1, k1, odd[r]);
        }
    }
    for r in 0..ROWS {
        let sum = _mm512_add_ps(even[r], odd[r]);
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * stride), sum) };
    }
}

/// `out[r] += Σ_j p[r·stride + j] · v_j` over the `count` value rows of one cache block
/// (`v[j·hd..]`, f16), for `rows` query vectors (the heads of a kv group, for one or several
/// tokens). Each 16-wide slice of a value row is converted once for up to 12 vectors, whose
/// accumulators stay in registers across the block; every output element is one FMA chain
/// over `j` in order, whatever the other vectors.
pub fn accumulate_values(
    out: &mut [f32],
    p: &[f32],
    stride: usize,
    count: usize,
    v: &[f16],
    hd: usize,
    rows: usize,
) {
    assert!(out.len() >= rows * hd && v.len() >= count * hd);
    assert!(count == 0 || rows == 0 || p.len() >= (rows - 1) * stride + count);
    #[cfg(target_arch = "x86_64")]
    if has_vnni() && hd.is_multiple_of(16) {
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(12);
            let (out, p) = (&mut out[r0 * hd..], &p[r0 * stride..]);
            // SAFETY: lengths asserted above; the CPU has AVX-512F.
            unsafe { with_rows!(n, accumulate_values_avx512, (out, p, stride, count, v, hd)) }
            r0 += n;
        }
        return;
    }
    for j in 0..count {
        for r in 0..rows {
            axpy_f16(
                &mut out[r * hd..(r + 1) * hd],
                p[r * stride + j],
                &v[j * hd..(j + 1) * hd],
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_values_avx512<const ROWS: usize>(
    out: &mut [f32],
    p: &[f32],
    stride: usize,
    count: usize,
    v: &[f16],
    hd: usize,
) {
    use std::arch::x86_64::*;
    for c in (0..hd).step_by(16) {
        let mut acc: [__m512; ROWS] =
            std::array::from_fn(|r| unsafe { _mm512_loadu_ps(out.as_ptr().add(r * hd + c)) });
        for j in 0..count {
            let vv = _mm512_cvtph_ps(unsafe {
                _mm256_loadu_si256(v.as_ptr().add(j * hd + c) as *const _)
            });
            for (r, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(unsafe { *p.get_unchecked(r * stride + j) });
                *a = _mm512_fmadd_ps(vv, w, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * hd + c), *a) };
        }
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        // SAFETY: the CPU has AVX-512F.
        let sum = unsafe { exp_sub_sum_avx512(x, max) };
        let inv = 1.0 / sum;
        x.iter_mut().for_each(|v| *v *= inv);
        return;
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `out = silu(gate) * up`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        // SAFETY: the CPU has AVX-512F; the three slices have the same length.
        unsafe { silu_mul_avx512(gate, up, out) };
        return;
    }
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// GELU with the exact erf form, `x · (1 + erf(x/√2)) / 2`, in place (BERT's activation).
/// erf is Abramowitz and Stegun's 7.1.26 (absolute error below 1.5e-7).
pub fn gelu_erf(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        // SAFETY: the CPU has AVX-512F.
        unsafe { gelu_erf_avx512(x) };
        return;
    }
    for v in x.iter_mut() {
        let z = *v * std::f32::consts::FRAC_1_SQRT_2;
        let a = z.abs();
        let t = 1.0 / (1.0 + ERF_P * a);
        let poly = ERF_A.iter().rev().fold(0.0, |acc, &c| (acc + c) * t);
        let erf = (1.0 - poly * (-a * a).exp()).copysign(z);
        *v = 0.5 * *v * (1.0 + erf);
    }
}

const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152_1,
    1.061_405_4,
];

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_erf_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let one = _mm512_set1_ps(1.0);
    let half = _mm512_set1_ps(0.5);
    let mut i = 0;
    while i < n {
        let mask: __mmask16 = if n - i >= 16 {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as u16
        };
        let p = unsafe { x.as_mut_ptr().add(i) };
        let v = unsafe { _mm512_maskz_loadu_ps(mask, p) };
        let z = _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let a = _mm512_abs_ps(z);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(ERF_P), a, one));
        let mut poly = _mm512_setzero_ps();
        for &c in ERF_A.iter().rev() {
            poly = _mm512_mul_ps(_mm512_add_ps(poly, _mm512_set1_ps(c)), t);
        }
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        let erf_abs = _mm512_fnmadd_ps(poly, e, one);
        // erf takes z's sign: negate where z < 0.
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, _mm512_setzero_ps());
        let erf = _mm512_mask_sub_ps(erf_abs, neg, _mm512_setzero_ps(), erf_abs);
        let g = _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, erf));
        unsafe { _mm512_mask_storeu_ps(p, mask, g) };
        i += 16;
    }
}

/// e^x for 16 lanes: 2^(x·log2 e) split into integer and fraction, the fraction by a degree-7
/// polynomial (relative error below 1e-7 on the reduced range), scaled with `vscalefps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.0));
    let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
    let n = _mm512_roundscale_ps::<0>(t);
    let f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(std::f32::consts::LN_2));
    // e^f, |f| <= ln2/2, Taylor to degree 7.
    let c = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let mut p = _mm512_set1_ps(c[0]);
    for &ci in &c[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    }
    _mm512_scalef_ps(p, n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sub_sum_avx512(x: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm512_set1_ps(max);
    let mut acc = _mm512_setzero_ps();
    let n = x.len();
    let mut i = 0;
    while i + 16 <= n {
        let p = unsafe { x.as_mut_ptr().add(i) };
        let e = exp512(_mm512_sub_ps(unsafe { _mm512_loadu_ps(p) }, m));
        unsafe { _mm512_storeu_ps(p, e) };
        acc = _mm512_add_ps(acc, e);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
        let p = unsafe { x.as_mut_ptr().add(i) };
        let v = unsafe { _mm512_mask_loadu_ps(m, mask, p) };
        let e = exp512(_mm512_sub_ps(v, m));
        let e = _mm512_maskz_mov_ps(mask, e);
        unsafe { _mm512_mask_storeu_ps(p, mask, e) };
        acc = _mm512_add_ps(acc, e);
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = gate.len().min(up.len()).min(out.len());
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let mask: __mmask16 = if n - i >= 16 {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as u16
        };
        let g = unsafe { _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(i)) };
        let u = unsafe { _mm512_maskz_loadu_ps(mask, up.as_ptr().add(i)) };
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, _mm512_mul_ps(s, u)) };
        i += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_the_erf_definition() {
        // erf by its Taylor series, in f64, as the reference.
        let erf = |z: f64| {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let xs: Vec<f32> = (-600..=600).map(|i| i as f32 / 100.0).collect();
        let mut got = xs.clone();
        gelu_erf(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = 0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2));
            assert!(
                (g as f64 - want).abs() < 2e-6,
                "gelu({x}) = {g}, want {want}"
            );
        }
    }

    fn reference(x: &[f32], m: usize, k: usize, w: &QMatrix, wf: &[f32]) -> Vec<f32> {
        let _ = w;
        let mut out = vec![0f32; m * (wf.len() / k)];
        let n = wf.len() / k;
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] * wf[j * k + t]).sum();
            }
        }
        out
    }

    #[test]
    fn gemm_matches_f32_and_is_batch_invariant() {
        let (n, k) = (40, 96);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let wf: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let w = QMatrix::from_f32(n, k, &wf);
        let m = 7;
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let pool = crate::pool::Pool::new(2, "test");
        let mut qa = QActs::default();
        qa.quantize(&x, m, k);
        let mut out = vec![0f32; m * n];
        gemm(&pool, &qa, &w, &mut out);
        let want = reference(&x, m, k, &w, &wf);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 0.05, "{a} vs {b}");
        }
        // Each row alone gives bit-identical results.
        for i in 0..m {
            let mut one = QActs::default();
            one.quantize(&x[i * k..(i + 1) * k], 1, k);
            let mut o = vec![0f32; n];
            gemm(&pool, &one, &w, &mut o);
            assert_eq!(&o[..], &out[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn portable_kernels_give_the_same_bits() {
        let (n, k, m) = (48, 128, 9);
        let wf: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1001) as f32 / 1001.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let w = QMatrix::from_f32(n, k, &wf);
        let pool = crate::pool::Pool::new(2, "test");
        let run = |portable: bool| {
            PORTABLE.store(portable, std::sync::atomic::Ordering::Relaxed);
            let mut qa = QActs::default();
            qa.quantize(&x, m, k);
            let mut out = vec![0f32; m * n];
            gemm(&pool, &qa, &w, &mut out);
            PORTABLE.store(false, std::sync::atomic::Ordering::Relaxed);
            out
        };
        let fast = run(false);
        let portable = run(true);
        if has_vnni() {
            assert_eq!(fast, portable, "the vector and portable GEMMs differ");
        }
        // Attention kernels: 3 heads of width 64 over 16 keys (transposed) and 16 values.
        let (hd, nrep) = (64, 3);
        let q: Vec<f32> = (0..nrep * hd)
            .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let kt: Vec<f16> = (0..hd * 16)
            .map(|i| f16::from_f32(((i * 13) % 23) as f32 * 0.05 - 0.5))
            .collect();
        let attn = |portable: bool| {
            PORTABLE.store(portable, std::sync::atomic::Ordering::Relaxed);
            let mut scores = vec![0f32; nrep * 16];
            scores16(&q, nrep, hd, &kt, 16, &mut scores, 16);
            let mut out = vec![0.5f32; nrep * hd];
            accumulate_values(&mut out, &scores, 16, 16, &kt, hd, nrep);
            PORTABLE.store(false, std::sync::atomic::Ordering::Relaxed);
            (scores, out)
        };
        let (fast, portable) = (attn(false), attn(true));
        if has_vnni() {
            assert_eq!(fast.0, portable.0, "attention scores differ");
            assert_eq!(fast.1, portable.1, "value accumulation differs");
        }
        // A tile of 5 tokens' heads (15 vectors) gives each vector the scores it gets alone.
        let rows = 15;
        let q: Vec<f32> = (0..rows * hd)
            .map(|i| ((i * 37) % 29) as f32 * 0.07 - 1.0)
            .collect();
        let mut tiled = vec![0f32; rows * 16];
        scores16(&q, rows, hd, &kt, 16, &mut tiled, 16);
        for r in 0..rows {
            let mut alone = vec![0f32; 16];
            scores16(&q[r * hd..(r + 1) * hd], 1, hd, &kt, 16, &mut alone, 16);
            assert_eq!(&tiled[r * 16..(r + 1) * 16], &alone[..], "vector {r}");
        }
        let mut acc_tiled = vec![0.25f32; rows * hd];
        accumulate_values(&mut acc_tiled, &tiled, 16, 16, &kt, hd, rows);
        for r in 0..rows {
            let mut alone = vec![0.25f32; hd];
            accumulate_values(&mut alone, &tiled[r * 16..], 16, 16, &kt, hd, 1);
            assert_eq!(
                &acc_tiled[r * hd..(r + 1) * hd],
                &alone[..],
                "values of vector {r}"
            );
        }
    }

    #[test]
    fn softmax_and_silu_match_scalar() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
        let want: Vec<f32> = {
            let m = x.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax(&mut x);
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let g: Vec<f32> = (0..21).map(|i| (i as f32 - 10.0) * 0.9).collect();
        let u: Vec<f32> = (0..21).map(|i| i as f32 * 0.1).collect();
        let mut o = vec![0f32; 21];
        silu_mul(&g, &u, &mut o);
        for i in 0..21 {
            let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            assert!((o[i] - want).abs() < 1e-5, "{} vs {want}", o[i]);
        }
    }

    #[test]
    fn vector_and_scalar_quantization_agree() {
        let x: Vec<f32> = (0..32)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.37)
            .collect();
        let (d, q) = quantize_block(&x);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d2, inv) = (amax / 127.0, 127.0 / amax);
        let _ = inv;
        assert_eq!(d, d2);
        for (a, v) in q.iter().zip(&x) {
            let want = (v * (1.0 / d2)).round_ties_even().clamp(-127.0, 127.0) as i8;
            assert_eq!(*a, want);
        }
    }

    #[test]
    fn f16_helpers() {
        let a: Vec<f32> = (0..64).map(|i| i as f32 * 0.25).collect();
        let b: Vec<f16> = (0..64)
            .map(|i| f16::from_f32(1.0 - i as f32 * 0.01))
            .collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y.to_f32()).sum();
        assert!((dot_f16(&a, &b) - want).abs() < 1e-2);
        let mut y = a.clone();
        axpy_f16(&mut y, 2.0, &b);
        for i in 0..64 {
            assert!((y[i] - (a[i] + 2.0 * b[i].to_f32())).abs() < 1e-4);
        }
    }
}
