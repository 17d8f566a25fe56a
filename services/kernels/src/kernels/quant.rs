//! Q8_0 quantization: 32-wide blocks of signed 8-bit quants with one scale.

use super::isa::Isa;

/// Quantization block (Q8_0).
pub const QK: usize = 32;

/// Q8_0 quantization of one 32-wide block: scale and quants (round half to even, as the
/// vector path does).
pub fn quantize_block(isa: Isa, x: &[f32]) -> (f32, [i8; QK]) {
    let mut q = [0i8; QK];
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() && x.len() == QK {
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

/// Quantizes `x` block by block into quants, scales and `128 × Σ quants` corrections.
pub(super) fn quantize_into(isa: Isa, x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    for (((xs, qb), dv), cv) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(d.iter_mut())
        .zip(corr.iter_mut())
    {
        let (s, qv) = quantize_block(isa, xs);
        *dv = s;
        qb.copy_from_slice(&qv);
        *cv = 128 * qv.iter().map(|&v| v as i32).sum::<i32>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_and_scalar_quantization_agree() {
        let x: Vec<f32> = (0..32)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.37)
            .collect();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d2 = amax / 127.0;
        for isa in [Isa::Portable, Isa::Avx512] {
            let (d, q) = quantize_block(isa, &x);
            assert_eq!(d, d2, "{isa:?}");
            for (a, v) in q.iter().zip(&x) {
                let want = (v * (1.0 / d2)).round_ties_even().clamp(-127.0, 127.0) as i8;
                assert_eq!(*a, want, "{isa:?}");
            }
        }
    }
}
