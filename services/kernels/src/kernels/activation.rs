//! Activations and normalizations of the forward passes: softmax, SiLU-gated products and
//! GELU, with AVX-512 versions built on a vector `exp`.

use super::isa::Isa;

/// In-place softmax.
pub fn softmax(isa: Isa, x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
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
pub fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
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
pub fn gelu_erf(isa: Isa, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
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
        let mask: __mmask16 = super::isa::lanes(n - i);
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
        let mask: __mmask16 = super::isa::lanes(n - i);
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
        for isa in [Isa::Portable, Isa::detect()] {
            let mut got = xs.clone();
            gelu_erf(isa, &mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                let want = 0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2));
                assert!(
                    (g as f64 - want).abs() < 2e-6,
                    "{isa:?}: gelu({x}) = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn softmax_and_silu_match_scalar() {
        for isa in [Isa::Portable, Isa::detect()] {
            let mut x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
            let want: Vec<f32> = {
                let m = x.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
                let s: f32 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            };
            softmax(isa, &mut x);
            for (a, b) in x.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{isa:?}: {a} vs {b}");
            }
            let g: Vec<f32> = (0..21).map(|i| (i as f32 - 10.0) * 0.9).collect();
            let u: Vec<f32> = (0..21).map(|i| i as f32 * 0.1).collect();
            let mut o = vec![0f32; 21];
            silu_mul(isa, &g, &u, &mut o);
            for i in 0..21 {
                let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
                assert!((o[i] - want).abs() < 1e-5, "{isa:?}: {} vs {want}", o[i]);
            }
        }
    }
}
