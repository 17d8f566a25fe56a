//! The attention kernels over a paged f16 key/value cache: 16 keys' scores for up to 12 query
//! vectors at once, and the probability-weighted sum of a block's value rows.

use half::f16;

use super::isa::Isa;
use super::vector::axpy_f16;

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
#[allow(clippy::too_many_arguments)] // the operands and their layout
pub fn scores16(
    isa: Isa,
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
    if isa.avx512() {
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
    use super::isa::load_f16x16;
    use std::arch::x86_64::*;
    let mut even = [_mm512_setzero_ps(); ROWS];
    let mut odd = [_mm512_setzero_ps(); ROWS];
    for d in (0..hd).step_by(2) {
        let k0 = unsafe { load_f16x16(kt.as_ptr().add(d * kstride)) };
        let k1 = unsafe { load_f16x16(kt.as_ptr().add((d + 1) * kstride)) };
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
#[allow(clippy::too_many_arguments)] // the operands and their layout
pub fn accumulate_values(
    isa: Isa,
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
    if isa.avx512() && hd.is_multiple_of(16) {
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(12);
            let (out, p) = (&mut out[r0 * hd..], &p[r0 * stride..]);
            let block = Weighted {
                p,
                stride,
                count,
                v,
                hd,
            };
            // SAFETY: lengths asserted above; the CPU has AVX-512F.
            unsafe { with_rows!(n, accumulate_values_avx512, (out, block)) }
            r0 += n;
        }
        return;
    }
    for j in 0..count {
        for r in 0..rows {
            axpy_f16(
                isa,
                &mut out[r * hd..(r + 1) * hd],
                p[r * stride + j],
                &v[j * hd..(j + 1) * hd],
            );
        }
    }
}

/// The value rows of one cache block and each vector's weights of them, as
/// [`accumulate_values`] takes them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Weighted<'a> {
    p: &'a [f32],
    stride: usize,
    count: usize,
    v: &'a [f16],
    hd: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_values_avx512<const ROWS: usize>(out: &mut [f32], b: Weighted) {
    use super::isa::load_f16x16;
    use std::arch::x86_64::*;
    let Weighted {
        p,
        stride,
        count,
        v,
        hd,
    } = b;
    for c in (0..hd).step_by(16) {
        let mut acc: [__m512; ROWS] =
            std::array::from_fn(|r| unsafe { _mm512_loadu_ps(out.as_ptr().add(r * hd + c)) });
        for j in 0..count {
            let vv = unsafe { load_f16x16(v.as_ptr().add(j * hd + c)) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_attention_gives_the_same_bits_and_tiles_do_not_matter() {
        // 3 heads of width 64 over 16 keys (transposed) and 16 values.
        let (hd, nrep) = (64, 3);
        let q: Vec<f32> = (0..nrep * hd)
            .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let kt: Vec<f16> = (0..hd * 16)
            .map(|i| f16::from_f32(((i * 13) % 23) as f32 * 0.05 - 0.5))
            .collect();
        let attn = |isa: Isa| {
            let mut scores = vec![0f32; nrep * 16];
            scores16(isa, &q, nrep, hd, &kt, 16, &mut scores, 16);
            let mut out = vec![0.5f32; nrep * hd];
            accumulate_values(isa, &mut out, &scores, 16, 16, &kt, hd, nrep);
            (scores, out)
        };
        let portable = attn(Isa::Portable);
        let fast = attn(Isa::Avx512);
        assert_eq!(fast.0, portable.0, "attention scores differ");
        assert_eq!(fast.1, portable.1, "value accumulation differs");
        // A tile of 5 tokens' heads (15 vectors) gives each vector the scores it gets alone.
        let rows = 15;
        let q: Vec<f32> = (0..rows * hd)
            .map(|i| ((i * 37) % 29) as f32 * 0.07 - 1.0)
            .collect();
        for isa in [Isa::Portable, Isa::detect()] {
            let mut tiled = vec![0f32; rows * 16];
            scores16(isa, &q, rows, hd, &kt, 16, &mut tiled, 16);
            for r in 0..rows {
                let mut alone = vec![0f32; 16];
                scores16(
                    isa,
                    &q[r * hd..(r + 1) * hd],
                    1,
                    hd,
                    &kt,
                    16,
                    &mut alone,
                    16,
                );
                assert_eq!(&tiled[r * 16..(r + 1) * 16], &alone[..], "vector {r}");
            }
            let mut acc_tiled = vec![0.25f32; rows * hd];
            accumulate_values(isa, &mut acc_tiled, &tiled, 16, 16, &kt, hd, rows);
            for r in 0..rows {
                let mut alone = vec![0.25f32; hd];
                accumulate_values(isa, &mut alone, &tiled[r * 16..], 16, 16, &kt, hd, 1);
                assert_eq!(
                    &acc_tiled[r * hd..(r + 1) * hd],
                    &alone[..],
                    "values of vector {r}"
                );
            }
        }
    }
}
