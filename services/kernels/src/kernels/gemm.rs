//! The int8 GEMM over Q8_0 weights: weights repacked for AVX-512 VNNI, activations quantized
//! per row and block, and the product split over the compute pool by groups of 16 output
//! columns.

use half::f16;

use super::isa::Isa;
use super::quant::{QK, quantize_block, quantize_into};

/// Rows of the weight matrix packed together (one AVX-512 register of outputs).
pub const NR: usize = 16;

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

    /// Quantizes f32 rows `w[n][k]` to Q8_0 (the same bits at every `isa`) and packs them.
    pub fn from_f32(isa: Isa, n: usize, k: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), n * k);
        let kbs = k / QK;
        let mut scales = vec![0f32; n * kbs];
        let mut quants = vec![0i8; n * k];
        for row in 0..n {
            for kb in 0..kbs {
                let x = &w[row * k + kb * QK..row * k + (kb + 1) * QK];
                let (s, q) = quantize_block(isa, x);
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
    /// Sizes the buffers for `m` rows of width `k`; the blocks per row.
    fn resize(&mut self, m: usize, k: usize) -> usize {
        let kbs = k / QK;
        self.m = m;
        self.k = k;
        self.q.resize(m * k, 0);
        self.d.resize(m * kbs, 0.0);
        self.corr.resize(m * kbs, 0);
        kbs
    }

    /// Quantizes `x[m][k]` (reusing this buffer); the tests' reference for [`Self::fill`].
    #[cfg(test)]
    pub fn quantize(&mut self, isa: Isa, x: &[f32], m: usize, k: usize) {
        debug_assert_eq!(x.len(), m * k);
        self.resize(m, k);
        quantize_into(isa, x, &mut self.q, &mut self.d, &mut self.corr);
    }

    /// Quantizes `m` rows of width `k` that `row(r, buf)` writes into `buf`, spreading the rows
    /// over the pool when there are enough of them (the row producer — a norm, an activation —
    /// then runs in parallel too, and its f32 output never leaves the thread's cache).
    pub fn fill(
        &mut self,
        pool: &crate::pool::Pool,
        isa: Isa,
        m: usize,
        k: usize,
        row: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        let kbs = self.resize(m, k);
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
                    quantize_into(isa, buf, qs, ds, cs);
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

/// `out[m][w.n] = x · Wᵀ`, split over `pool`'s threads by groups of 16 output columns; the
/// VNNI kernel where `isa` has it, else the portable one (the same bits).
pub fn gemm(pool: &crate::pool::Pool, isa: Isa, x: &QActs, w: &QMatrix, out: &mut [f32]) {
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
    let vnni = isa.vnni();
    let run = |c: usize| {
        let g0 = c * per;
        let g1 = ((c + 1) * per).min(w.groups);
        let p = ptr;
        for g in g0..g1 {
            // SAFETY: group g writes only columns g*16..g*16+16 of every row, within `out`;
            // `vnni` is true only on a CPU with AVX-512 VNNI (`Isa::vnni`).
            unsafe { gemm_group(vnni, x, w, g, p.0) };
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

/// Where a tile's operands are (callers keep `i` below the tile's rows and `kb` below `kbs`).
impl Tile {
    /// Row `i`'s quantized activations of block `kb`.
    unsafe fn x(&self, i: usize, kb: usize) -> *const i8 {
        unsafe { self.xq.add(i * self.k + kb * QK) }
    }

    /// Row `i`'s activation scale and the weights' zero-point correction of block `kb`.
    unsafe fn x_scale(&self, i: usize, kb: usize) -> (f32, i32) {
        unsafe {
            (
                *self.xd.add(i * self.kbs + kb),
                *self.xc.add(i * self.kbs + kb),
            )
        }
    }

    /// Block `kb` of the group's weights (16 rows interleaved by 4) and their 16 scales.
    unsafe fn w(&self, kb: usize) -> (*const u8, *const f16) {
        unsafe { (self.wq.add(kb * QK * NR), self.wd.add(kb * NR)) }
    }

    /// Row `i` of the output.
    unsafe fn out(&self, i: usize) -> *mut f32 {
        unsafe { self.out.add(i * self.ldo) }
    }
}

/// All rows of `x` against weight group `g`, written to `out` (row stride `w.n`); `vnni` only
/// where the CPU has AVX-512 VNNI.
unsafe fn gemm_group(vnni: bool, x: &QActs, w: &QMatrix, g: usize, out: *mut f32) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = vnni;
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
            if vnni {
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
    use super::isa::load_f16x16;
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); MR];
    for kb in 0..t.kbs {
        let (wb, wd) = unsafe { t.w(kb) };
        let w: [__m512i; 8] =
            std::array::from_fn(|q| unsafe { _mm512_loadu_si512(wb.add(q * 64) as *const _) });
        let dw = unsafe { load_f16x16(wd) };
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = unsafe { t.x(i, kb) } as *const i32;
            let (dx, c) = unsafe { t.x_scale(i, kb) };
            let mut s = _mm512_setzero_si512();
            for (q, wv) in w.iter().enumerate() {
                let xv = _mm512_set1_epi32(unsafe { xb.add(q).read_unaligned() });
                s = _mm512_dpbusd_epi32(s, *wv, xv);
            }
            let s = _mm512_sub_epi32(s, _mm512_set1_epi32(c));
            let f = _mm512_cvtepi32_ps(s);
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
            *a = _mm512_fmadd_ps(f, scale, *a);
        }
    }
    let mask: __mmask16 = super::isa::lanes(t.ncols);
    for (i, a) in acc.iter().enumerate() {
        unsafe { _mm512_mask_storeu_ps(t.out(i), mask, *a) };
    }
}

unsafe fn tile_portable(rows: usize, t: Tile) {
    for i in 0..rows {
        let mut acc = [0f32; NR];
        for kb in 0..t.kbs {
            let (xb, (wb, wd)) = unsafe { (t.x(i, kb), t.w(kb)) };
            let mut s = [0i32; NR];
            for q in 0..QK / 4 {
                for (r, sr) in s.iter_mut().enumerate() {
                    for b in 0..4 {
                        let xv = unsafe { *xb.add(q * 4 + b) } as i32;
                        let wv = unsafe { *wb.add(q * 4 * NR + r * 4 + b) } as i32;
                        *sr += xv * wv;
                    }
                }
            }
            let (dx, c) = unsafe { t.x_scale(i, kb) };
            for (r, a) in acc.iter_mut().enumerate() {
                let f = (s[r] - c) as f32;
                let scale = unsafe { (*wd.add(r)).to_f32() } * dx;
                *a = f.mul_add(scale, *a);
            }
        }
        let out = unsafe { t.out(i) };
        for (r, a) in acc.iter().enumerate().take(t.ncols) {
            unsafe { *out.add(r) = *a };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, wf: &[f32]) -> Vec<f32> {
        let n = wf.len() / k;
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] * wf[j * k + t]).sum();
            }
        }
        out
    }

    fn product(isa: Isa, x: &[f32], m: usize, k: usize, w: &QMatrix) -> Vec<f32> {
        let pool = crate::pool::Pool::new(2, "test");
        let mut qa = QActs::default();
        qa.quantize(isa, x, m, k);
        let mut out = vec![0f32; m * w.n];
        gemm(&pool, isa, &qa, w, &mut out);
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
        let isa = Isa::detect();
        let w = QMatrix::from_f32(isa, n, k, &wf);
        let m = 7;
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let out = product(isa, &x, m, k, &w);
        let want = reference(&x, m, k, &wf);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 0.05, "{a} vs {b}");
        }
        // Each row alone gives bit-identical results.
        for i in 0..m {
            let o = product(isa, &x[i * k..(i + 1) * k], 1, k, &w);
            assert_eq!(&o[..], &out[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn portable_gemm_gives_the_same_bits() {
        let (n, k, m) = (48, 128, 9);
        let wf: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1001) as f32 / 1001.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let w = QMatrix::from_f32(Isa::Portable, n, k, &wf);
        let portable = product(Isa::Portable, &x, m, k, &w);
        for isa in [Isa::Avx512, Isa::Avx512Vnni] {
            assert_eq!(
                QMatrix::from_f32(isa, n, k, &wf).qs,
                w.qs,
                "{isa:?}: the weights quantize alike"
            );
            assert_eq!(
                product(isa, &x, m, k, &w),
                portable,
                "{isa:?}: the GEMM differs from the portable one"
            );
        }
    }
}
