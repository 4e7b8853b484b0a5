//! AVX-512 (F, BW, VL) with F16C conversions: 16 f32 lanes.

use std::arch::x86_64::*;

use super::Simd;

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
            let picked = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s);
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(picked));
            out
        }
    }
}
