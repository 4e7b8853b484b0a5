//! NEON (Advanced SIMD, every aarch64 CPU: Grace / Neoverse V2, Graviton, Ampere): 4 f32 lanes.
//!
//! f16 → f32 is FCVTL, part of the base ARMv8 instruction set (no FEAT_FP16 needed); Rust's
//! f16 NEON intrinsics are not stable, so it is written as inline assembly. bf16 → f32 is a
//! widening shift by 16 (SHLL). 32 vector registers leave room for 16 accumulators.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{exp_consts as c, Simd};

#[derive(Clone, Copy)]
pub(crate) struct Neon;

// SAFETY: every method is only called from functions compiled with neon (isa_dispatch!).
unsafe impl Simd for Neon {
    // The methods' `# Safety` contracts are the trait's (`Simd`).
    const LANES: usize = 4;
    const ACC_BUDGET: usize = 16;
    type F = float32x4_t;

    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: `p` is readable for LANES floats, NEON enabled (trait contract).
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: `p` is writable for LANES floats, NEON enabled (trait contract).
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> float32x4_t {
        // SAFETY: `p` is readable for LANES u16s (trait contract); FCVTL reads and writes
        // vector registers only.
        unsafe {
            let h = vld1_u16(p);
            let out: float32x4_t;
            asm!("fcvtl {o:v}.4s, {i:v}.4h", o = lateout(vreg) out, i = in(vreg) h,
                 options(pure, nomem, nostack, preserves_flags));
            out
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> float32x4_t {
        // SAFETY: `p` is readable for LANES u16s, NEON enabled (trait contract).
        unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p))) }
    }
    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, acc: float32x4_t) -> float32x4_t {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vfmaq_f32(acc, a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vmaxq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn exp(x: float32x4_t) -> float32x4_t {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe {
            let keep = vcgeq_f32(x, vdupq_n_f32(c::LO));
            let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(c::LO)), vdupq_n_f32(c::HI));
            let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(c::LOG2E)));
            let r = vfmsq_f32(x, n, vdupq_n_f32(c::LN2_HI));
            let r = vfmsq_f32(r, n, vdupq_n_f32(c::LN2_LO));
            let mut p = vdupq_n_f32(c::P[0]);
            for k in &c::P[1..] {
                p = vfmaq_f32(vdupq_n_f32(*k), p, r);
            }
            let p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), vmulq_f32(p, r), r);
            // 2^n: n + 127 in the exponent field (n ≥ -126 after the clamp).
            let pow2 = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
            let e = vmulq_f32(p, vreinterpretq_f32_s32(pow2));
            vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(e), keep))
        }
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: float32x4_t) -> f32 {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: float32x4_t) -> f32 {
        // SAFETY: registers only; NEON is enabled (trait contract).
        unsafe { vmaxvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn reduce4(v: [float32x4_t; 4]) -> [f32; 4] {
        // SAFETY: registers and a local [f32; 4]; NEON is enabled (trait contract).
        unsafe {
            // Pairwise adds twice: lane j ends up holding the sum of v[j].
            let ab = vpaddq_f32(v[0], v[1]);
            let cd = vpaddq_f32(v[2], v[3]);
            let mut out = [0.0f32; 4];
            vst1q_f32(out.as_mut_ptr(), vpaddq_f32(ab, cd));
            out
        }
    }
}
