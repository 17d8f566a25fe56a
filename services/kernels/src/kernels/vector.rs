//! Vector primitives: dot products (f32, and f32 against f16) and `y += a·x` over f16.

use half::f16;

use super::isa::Isa;

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

/// `Σ a[i]·b[i]` with `b` in f16 (`a.len() == b.len()`, a multiple of 16).
#[inline]
pub fn dot_f16(isa: Isa, a: &[f32], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() && a.len().is_multiple_of(16) {
        // SAFETY: lengths checked; the CPU has AVX-512F.
        return unsafe { dot_f16_avx512(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f16_avx512(a: &[f32], b: &[f16]) -> f32 {
    use super::isa::load_f16x16;
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    for i in (0..a.len()).step_by(16) {
        let av = unsafe { _mm512_loadu_ps(a.as_ptr().add(i)) };
        let bv = unsafe { load_f16x16(b.as_ptr().add(i)) };
        acc = _mm512_fmadd_ps(av, bv, acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// `y += a · x` with `x` in f16 (`y.len() == x.len()`, a multiple of 16).
#[inline]
pub fn axpy_f16(isa: Isa, y: &mut [f32], a: f32, x: &[f16]) {
    debug_assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() && y.len().is_multiple_of(16) {
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
    use super::isa::load_f16x16;
    use std::arch::x86_64::*;
    let av = _mm512_set1_ps(a);
    for i in (0..y.len()).step_by(16) {
        let yp = unsafe { y.as_mut_ptr().add(i) };
        let xv = unsafe { load_f16x16(x.as_ptr().add(i)) };
        unsafe { _mm512_storeu_ps(yp, _mm512_fmadd_ps(xv, av, _mm512_loadu_ps(yp))) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_helpers() {
        let a: Vec<f32> = (0..64).map(|i| i as f32 * 0.25).collect();
        let b: Vec<f16> = (0..64)
            .map(|i| f16::from_f32(1.0 - i as f32 * 0.01))
            .collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y.to_f32()).sum();
        for isa in [Isa::Portable, Isa::detect()] {
            assert!((dot_f16(isa, &a, &b) - want).abs() < 1e-2, "{isa:?}");
            let mut y = a.clone();
            axpy_f16(isa, &mut y, 2.0, &b);
            for i in 0..64 {
                assert!(
                    (y[i] - (a[i] + 2.0 * b[i].to_f32())).abs() < 1e-4,
                    "{isa:?}"
                );
            }
        }
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let naive: f32 = x.iter().map(|v| v * v).sum();
        assert!((dot_f32(&x, &x) - naive).abs() < 1e-3);
    }
}
