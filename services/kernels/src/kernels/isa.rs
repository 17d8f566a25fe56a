//! Which instruction set the kernels use: detected once by the caller ([`Isa::detect`]) and
//! passed to every kernel, so a test can run the portable kernels ([`Isa::Portable`]) beside the
//! vector ones in one process.

use std::sync::OnceLock;

/// An instruction set level of the kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust (the compiler's own vectorization): every CPU.
    Portable,
    /// AVX-512 F and BW: the attention, activation and quantization kernels.
    Avx512,
    /// AVX-512 VNNI on top: the int8 GEMM too.
    Avx512Vnni,
}

impl Isa {
    /// The best level this CPU supports.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let f = std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw");
                if f && std::is_x86_feature_detected!("avx512vnni") {
                    return Isa::Avx512Vnni;
                }
                if f {
                    return Isa::Avx512;
                }
            }
            Isa::Portable
        })
    }

    /// The level actually used: this one, or the CPU's best if that is lower (a level the CPU
    /// lacks is never run, whatever a caller passes).
    fn usable(self) -> Isa {
        self.min(Isa::detect())
    }

    /// Whether the AVX-512 F/BW kernels run.
    #[inline]
    pub fn avx512(self) -> bool {
        self.usable() >= Isa::Avx512
    }

    /// Whether the AVX-512 VNNI GEMM runs.
    #[inline]
    pub fn vnni(self) -> bool {
        self.usable() >= Isa::Avx512Vnni
    }

    /// The GEMM kernel this level runs, for logs and `Info`.
    pub fn gemm_kernel(self) -> &'static str {
        if self.vnni() {
            "avx512-vnni int8"
        } else {
            "portable int8"
        }
    }
}

/// The lanes of a 16-wide AVX-512 operation that the `left` elements still to do fill.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn lanes(left: usize) -> u16 {
    if left >= 16 {
        0xffff
    } else {
        ((1u32 << left) - 1) as u16
    }
}

/// The 16 f16 values at `p`, as f32.
///
/// # Safety
/// 32 bytes at `p` are readable; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn load_f16x16(p: *const half::f16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const _) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_is_always_usable_and_higher_levels_only_when_detected() {
        assert!(!Isa::Portable.avx512() && !Isa::Portable.vnni());
        let best = Isa::detect();
        assert_eq!(Isa::Avx512Vnni.vnni(), best == Isa::Avx512Vnni);
        assert_eq!(Isa::Avx512.avx512(), best >= Isa::Avx512);
        assert!(
            !Isa::Avx512.vnni(),
            "AVX-512 without VNNI runs the portable GEMM"
        );
    }
}
