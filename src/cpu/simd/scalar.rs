//! Portable fallback: 8 f32 lanes in an array; the compiler vectorises what the target allows.

use super::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Scalar;

const N: usize = 8;

/// Every f16 bit pattern widened to f32: a table lookup beats software conversion ~10×.
fn f16_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect()
    })
}

// SAFETY: plain Rust, valid on every target; pointers are read/written for N elements.
unsafe impl Simd for Scalar {
    // The methods' `# Safety` contracts are the trait's (`Simd`).
    const LANES: usize = N;
    const ACC_BUDGET: usize = 8;
    type F = [f32; N];

    #[inline(always)]
    unsafe fn zero() -> Self::F {
        [0.0; N]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::F {
        [x; N]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::F {
        // SAFETY: `p` is readable for N floats (trait contract); read_unaligned needs no alignment.
        unsafe { (p as *const [f32; N]).read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::F) {
        // SAFETY: `p` is writable for N floats (trait contract); write_unaligned needs no alignment.
        unsafe { (p as *mut [f32; N]).write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self::F {
        // SAFETY: `p` is readable for N u16s (trait contract); read_unaligned needs no alignment.
        let raw = unsafe { (p as *const [u16; N]).read_unaligned() };
        let table = f16_table();
        raw.map(|b| table[b as usize])
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self::F {
        // SAFETY: `p` is readable for N u16s (trait contract); read_unaligned needs no alignment.
        let raw = unsafe { (p as *const [u16; N]).read_unaligned() };
        raw.map(|b| f32::from_bits((b as u32) << 16))
    }
    #[inline(always)]
    unsafe fn fma(a: Self::F, b: Self::F, acc: Self::F) -> Self::F {
        // Not mul_add: without a hardware FMA in the baseline target it becomes a libm call.
        std::array::from_fn(|i| a[i] * b[i] + acc[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::F, b: Self::F) -> Self::F {
        std::array::from_fn(|i| a[i].max(b[i]))
    }
    #[inline(always)]
    unsafe fn exp(x: Self::F) -> Self::F {
        // libm's expf: exact to an ulp; below the normal range it already rounds to 0.
        x.map(|v| {
            if v < super::exp_consts::LO {
                0.0
            } else {
                v.exp()
            }
        })
    }
    #[inline(always)]
    unsafe fn reduce_max(v: Self::F) -> f32 {
        v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: Self::F) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn reduce4(v: [Self::F; 4]) -> [f32; 4] {
        // SAFETY: `Scalar::reduce_sum` is plain Rust with no precondition.
        v.map(|x| unsafe { Self::reduce_sum(x) })
    }
}
