//! AVX2 + FMA + F16C: 8 f32 lanes.

use std::arch::x86_64::*;

use super::{exp_consts as c, Simd};

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

// SAFETY: every method is only called from functions compiled with avx2,fma,f16c (isa_dispatch!).
unsafe impl Simd for Avx2 {
    // The methods' `# Safety` contracts are the trait's (`Simd`).
    const LANES: usize = 8;
    const ACC_BUDGET: usize = 8;
    type F = __m256;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: `p` is readable for LANES floats, AVX2 enabled (trait contract).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: `p` is writable for LANES floats, AVX2 enabled (trait contract).
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        // SAFETY: `p` is readable for LANES u16s, AVX2 enabled (trait contract).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        // SAFETY: `p` is readable for LANES u16s, AVX2 enabled (trait contract).
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, acc: __m256) -> __m256 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe { _mm256_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        // SAFETY: registers only; AVX2 + FMA are enabled (trait contract).
        unsafe {
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(c::LO));
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(c::LO)),
                _mm256_set1_ps(c::HI),
            );
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(c::LOG2E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c::LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c::LN2_LO), r);
            let mut p = _mm256_set1_ps(c::P[0]);
            for k in &c::P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*k));
            }
            let p = _mm256_fmadd_ps(
                _mm256_mul_ps(p, r),
                r,
                _mm256_add_ps(r, _mm256_set1_ps(1.0)),
            );
            // 2^n: n + 127 in the exponent field (n ≥ -126 after the clamp).
            let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow2)), keep)
        }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: __m256) -> f32 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: __m256) -> f32 {
        // SAFETY: registers only; AVX2 is enabled (trait contract).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn reduce4(v: [__m256; 4]) -> [f32; 4] {
        // SAFETY: registers and a local [f32; 4]; AVX2 is enabled (trait contract).
        unsafe {
            // hadd pairs twice: each 128-bit half then holds partial sums [a b c d].
            let ab = _mm256_hadd_ps(v[0], v[1]);
            let cd = _mm256_hadd_ps(v[2], v[3]);
            let abcd = _mm256_hadd_ps(ab, cd);
            let s = _mm_add_ps(
                _mm256_castps256_ps128(abcd),
                _mm256_extractf128_ps::<1>(abcd),
            );
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), s);
            out
        }
    }
}
