//! One SIMD vocabulary (`Simd`), one file per instruction set, one dispatch point (`isa()`).
//!
//! Kernels are written once, generic over `S: Simd` and the stored element type `E: Element`,
//! and marked `#[inline(always)]`; `isa_dispatch!` instantiates each kernel inside a
//! `#[target_feature]` wrapper per instruction set, so one wheel runs the best code on any x86-64
//! or aarch64 CPU (and the scalar code elsewhere) without `-C target-cpu=native`.
//!
//! Instruction sets: AVX2 + FMA + F16C and AVX-512 (F, BW, VL) on x86-64, NEON (Advanced SIMD,
//! with FCVTL for f16) on aarch64, and a portable scalar fallback. Which one runs is decided at
//! run time (`is_x86_feature_detected!` / `is_aarch64_feature_detected!`); tests and benchmarks
//! force each one the CPU supports. How the kernels stream memory on this CPU (prefetching,
//! streaming stores) is [`tuning`], also chosen at run time.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
mod tuning;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) use neon::Neon;
pub(crate) use scalar::Scalar;
pub use tuning::{cpu_vendor, tuning, Tuning};

use std::sync::OnceLock;

/// Instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    Neon,
}

impl Isa {
    /// Every instruction set the crate knows, on any architecture.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether this CPU can run code built for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every instruction set this CPU supports, best last.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }
}

/// The best instruction set of this CPU, detected once.
pub fn isa() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| *Isa::available().last().expect("scalar is always available"))
}

/// Hints the cache to fetch the line holding `p` (any address: a prefetch never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    // SAFETY: prefetch instructions do not access memory architecturally and never fault.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    // SAFETY: as above; PRFM is a hint in every aarch64 implementation.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// As [`prefetch`], with the non-temporal hint: fetched for one use, kept out of the outer
/// cache levels where the CPU supports that.
#[inline(always)]
pub(crate) fn prefetch_nta(p: *const u8) {
    // SAFETY: prefetch instructions do not access memory architecturally and never fault.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_NTA }>(p as *const i8)
    };
    // SAFETY: as above; PRFM is a hint in every aarch64 implementation.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        std::arch::asm!("prfm pldl1strm, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// A vector of f32 lanes and the operations the kernels need.
///
/// # Safety
/// Implementations use instructions of one instruction set: callers must only run them inside
/// a function compiled for it (see `isa_dispatch!`). Pointer arguments must be valid for
/// `LANES` elements.
pub(crate) unsafe trait Simd {
    const LANES: usize;
    type F: Copy;
    /// # Safety
    /// Only inside a function compiled for the implementation's instruction set (the same
    /// holds for every method).
    unsafe fn zero() -> Self::F;
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn splat(x: f32) -> Self::F;
    /// # Safety
    /// As [`Simd::zero`]; `p` is readable for `LANES` floats (no alignment needed).
    unsafe fn load(p: *const f32) -> Self::F;
    /// # Safety
    /// As [`Simd::zero`]; `p` is writable for `LANES` floats (no alignment needed).
    unsafe fn store(p: *mut f32, v: Self::F);
    /// # Safety
    /// As [`Simd::zero`]; `p` is readable for `LANES` f16 bit patterns.
    unsafe fn load_f16(p: *const u16) -> Self::F;
    /// # Safety
    /// As [`Simd::zero`]; `p` is readable for `LANES` bf16 bit patterns.
    unsafe fn load_bf16(p: *const u16) -> Self::F;
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn fma(a: Self::F, b: Self::F, acc: Self::F) -> Self::F;
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// Lane-wise maximum (NaN handling unspecified: the kernels never pass NaN here on purpose).
    ///
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn max(a: Self::F, b: Self::F) -> Self::F;
    /// Lane-wise `e^x`, relative error within a few ulp for `x ≥ -87.3`, exactly 0 below
    /// (so `-inf`, a masked token, weighs nothing).
    ///
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn exp(x: Self::F) -> Self::F;
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn reduce_sum(v: Self::F) -> f32;
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn reduce_max(v: Self::F) -> f32;
    /// The lane sums of four vectors at once (cheaper than four `reduce_sum`s).
    ///
    /// # Safety
    /// As [`Simd::zero`].
    unsafe fn reduce4(v: [Self::F; 4]) -> [f32; 4];
    /// Accumulators the kernels may keep in registers at once.
    const ACC_BUDGET: usize;
}

/// Constants of the vector `e^x` every implementation shares (Cody–Waite reduction
/// `x = n·ln2 + r`, |r| ≤ ln2/2, then a degree-6 polynomial for `e^r`, Cephes' `expf`).
pub(crate) mod exp_consts {
    /// Below this, `e^x` is under f32's normal range: the kernels return 0.
    pub const LO: f32 = -87.336_55;
    pub const HI: f32 = 88.376_26;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 split in a part exact in f32 and the rest, so `x - n·ln2` loses nothing.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
}

/// A stored element type: how to widen `LANES` of them (or one) to f32. (Implementations'
/// `load` keeps the trait's `# Safety` contract.)
pub(crate) trait Element: Copy + Send + Sync + 'static {
    /// # Safety
    /// `p` must be valid for `S::LANES` elements and the caller must run under `S`'s features.
    unsafe fn load<S: Simd>(p: *const Self) -> S::F;
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::F {
        // SAFETY: the caller's contract is `S::load`'s.
        unsafe { S::load(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for half::f16 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::F {
        // SAFETY: f16 is a u16 bit pattern; the caller's contract is `S::load_f16`'s.
        unsafe { S::load_f16(p as *const u16) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl Element for half::bf16 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::F {
        // SAFETY: bf16 is a u16 bit pattern; the caller's contract is `S::load_bf16`'s.
        unsafe { S::load_bf16(p as *const u16) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Calls `$body` with the type alias `E` bound to the element type of `$dtype`.
macro_rules! with_element {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F16 => {
                type $E = half::f16;
                $body
            }
            $crate::dtype::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            $crate::dtype::DType::F32 => {
                type $E = f32;
                $body
            }
        }
    };
}
pub(crate) use with_element;

/// Defines `pub(crate) fn $name<E: Element>(isa: Isa, args...)` that runs
/// `$kernel::<S, E>(args...)` compiled for the chosen instruction set.
macro_rules! isa_dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty = $kernel:ident) => {
        $(#[$meta])*
        /// # Safety
        /// The same contract as the kernel it dispatches to.
        // Kernels take raw pointers, lengths and strides: a struct of them would only rename them.
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $name<E: $crate::cpu::simd::Element>(
            isa: $crate::cpu::simd::Isa, $($arg: $ty),*
        ) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The kernel's contract, on a CPU with these features.
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<E: $crate::cpu::simd::Element>($($arg: $ty),*) -> $ret {
                    // SAFETY: compiled for AVX-512, as `Avx512` requires; the rest is the caller's.
                    unsafe { $kernel::<$crate::cpu::simd::Avx512, E>($($arg),*) }
                }
                /// # Safety
                /// The kernel's contract, on a CPU with these features.
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<E: $crate::cpu::simd::Element>($($arg: $ty),*) -> $ret {
                    // SAFETY: compiled for AVX2, as `Avx2` requires; the rest is the caller's.
                    unsafe { $kernel::<$crate::cpu::simd::Avx2, E>($($arg),*) }
                }
                match isa {
                    // SAFETY: `isa` comes from `Isa::supported` checks (see `isa()`).
                    $crate::cpu::simd::Isa::Avx512 => return unsafe { avx512::<E>($($arg),*) },
                    $crate::cpu::simd::Isa::Avx2 => return unsafe { avx2::<E>($($arg),*) },
                    _ => {}
                }
            }
            #[cfg(target_arch = "aarch64")]
            {
                /// # Safety
                /// The kernel's contract, on a CPU with these features.
                #[target_feature(enable = "neon")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn neon<E: $crate::cpu::simd::Element>($($arg: $ty),*) -> $ret {
                    // SAFETY: compiled for NEON, as `Neon` requires; the rest is the caller's.
                    unsafe { $kernel::<$crate::cpu::simd::Neon, E>($($arg),*) }
                }
                if isa == $crate::cpu::simd::Isa::Neon {
                    // SAFETY: `isa` comes from `Isa::supported` checks (see `isa()`).
                    return unsafe { neon::<E>($($arg),*) };
                }
            }
            // SAFETY: `Scalar` runs anywhere; the rest is the caller's contract. (An `Isa` of
            // another architecture cannot reach here: `Isa::supported` is false for it and
            // the public operations check it.)
            unsafe { $kernel::<$crate::cpu::simd::Scalar, E>($($arg),*) }
        }
    };
}
pub(crate) use isa_dispatch;
