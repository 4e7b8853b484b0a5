//! AVX-512 (F, BW, VL) with F16C conversions: 16 f32 lanes.

use std::arch::x86_64::*;

use super::{exp_consts as c, Simd};

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

// SAFETY: every method is only called from functions compiled with avx512f,avx512bw,avx512vl,
// avx2,fma,f16c (isa_dispatch!).
unsafe impl Simd for Avx512 {
    // The methods' `# Safety` contracts are the trait's (`Simd`).
    const LANES: usize = 16;
    const ACC_BUDGET: usize = 16;
    type F = __m512;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: `p` is readable for LANES floats, AVX-512 enabled (trait contract).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: `p` is writable for LANES floats, AVX-512 enabled (trait contract).
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        // SAFETY: `p` is readable for LANES u16s, AVX-512 enabled (trait contract).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        // SAFETY: `p` is readable for LANES u16s, AVX-512 enabled (trait contract).
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, acc: __m512) -> __m512 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe {
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(c::LO));
            let x = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(c::LO)),
                _mm512_set1_ps(c::HI),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(c::LOG2E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c::LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c::LN2_LO), r);
            let mut p = _mm512_set1_ps(c::P[0]);
            for k in &c::P[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*k));
            }
            let p = _mm512_fmadd_ps(
                _mm512_mul_ps(p, r),
                r,
                _mm512_add_ps(r, _mm512_set1_ps(1.0)),
            );
            // 2^n: n + 127 in the exponent field (n ≥ -126 after the clamp).
            let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            ));
            _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, _mm512_castsi512_ps(pow2)))
        }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: __m512) -> f32 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: __m512) -> f32 {
        // SAFETY: registers only; AVX-512 is enabled (trait contract).
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn reduce4(v: [__m512; 4]) -> [f32; 4] {
        // SAFETY: registers and a local [f32; 4]; AVX-512 is enabled (trait contract).
        unsafe {
            // Fold 128-bit quarters so that quarter j of `s` holds four partials of v[j].
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(v[0], v[1]),
                _mm512_shuffle_f32x4::<0xEE>(v[0], v[1]),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(v[2], v[3]),
                _mm512_shuffle_f32x4::<0xEE>(v[2], v[3]),
            );
            let s = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(ab, cd),
                _mm512_shuffle_f32x4::<0xDD>(ab, cd),
            );
            // Sum within each quarter, then collect element 0 of every quarter.
            let s = _mm512_add_ps(s, _mm512_permute_ps::<0x4E>(s));
            let s = _mm512_add_ps(s, _mm512_permute_ps::<0xB1>(s));
            let picked = _mm512_permutexvar_ps(
                _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                s,
            );
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(picked));
            out
        }
    }
}
