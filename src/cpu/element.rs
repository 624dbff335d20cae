//! The storage dtypes the CPU backend reads and writes, and the arithmetic types elements
//! are computed in (f32, or f64 for f64 inputs). f16 and bf16 go through conversion buffers.

use std::ops::{Add, Mul, Neg, Sub};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Elements converted at a time for 16-bit inputs, and the longest run handed to an op.
pub(super) const CHUNK: usize = 512;

// Numeric types

/// The arithmetic type elements are computed in.
pub(super) trait Acc:
    Copy
    + Default
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
{
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// This thread's conversion buffers (mean, target, upstream, output, negated output).
    /// Zeroed once per thread rather than once per unit of work: on small inputs, zeroing
    /// 10-20 KB per unit was a large part of a call. A unit of work runs start to finish on
    /// one thread and units never nest, so the buffers are never borrowed twice.
    fn scratch() -> *mut Buffers<Self>;
}

/// Conversion buffers of a unit of work, in the accumulation type.
pub(super) type Buffers<A> = [[A; CHUNK]; 5];

macro_rules! impl_acc {
    ($($t:ty => $scratch:ident),*) => {$(
        thread_local! {
            static $scratch: std::cell::UnsafeCell<Buffers<$t>> =
                const { std::cell::UnsafeCell::new([[0.0; CHUNK]; 5]) };
        }
        impl Acc for $t {
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn scratch() -> *mut Buffers<Self> {
                $scratch.with(|b| b.get())
            }
        }
    )*};
}
impl_acc!(f32 => SCRATCH_F32, f64 => SCRATCH_F64);

/// A storage dtype and its accumulation type.
pub(super) trait Element: Copy + Send + Sync + 'static {
    type Acc: Acc;
    /// `src` in the accumulation type: `src` itself for f32/f64, else converted into `buf`.
    fn view<'a>(src: &'a [Self], buf: &'a mut [Self::Acc; CHUNK]) -> &'a [Self::Acc];
    /// Where to compute values destined for `dst`: `buf` (f32/f64 use `dst` itself).
    #[inline(always)]
    fn out_view<'a>(dst: &'a mut [Self], buf: &'a mut [Self::Acc; CHUNK]) -> &'a mut [Self::Acc] {
        &mut buf[..dst.len()]
    }
    /// Moves values computed in `out_view`'s buffer into `dst` (nothing to do for f32/f64).
    fn commit(buf: &[Self::Acc; CHUNK], dst: &mut [Self]);
    /// One value, exactly, as f64.
    fn to_f64(self) -> f64;
}

/// f32 and f64 are their own accumulation types.
macro_rules! impl_native_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            type Acc = $t;
            #[inline(always)]
            fn view<'a>(src: &'a [$t], _: &'a mut [$t; CHUNK]) -> &'a [$t] {
                src
            }
            #[inline(always)]
            fn out_view<'a>(dst: &'a mut [$t], _: &'a mut [$t; CHUNK]) -> &'a mut [$t] {
                dst
            }
            #[inline(always)]
            fn commit(_: &[$t; CHUNK], _: &mut [$t]) {}
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    )*};
}
impl_native_element!(f32, f64);

impl Element for f16 {
    type Acc = f32;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline(always)]
    fn view<'a>(src: &'a [f16], buf: &'a mut [f32; CHUNK]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf); // F16C when the CPU has it
        buf
    }
    #[inline(always)]
    fn commit(buf: &[f32; CHUNK], dst: &mut [f16]) {
        dst.convert_from_f32_slice(&buf[..dst.len()])
    }
}

impl Element for bf16 {
    type Acc = f32;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    #[inline(always)]
    fn view<'a>(src: &'a [bf16], buf: &'a mut [f32; CHUNK]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        // Exact: bf16 is the top half of an f32 (this form vectorises).
        for (d, s) in buf.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
        buf
    }
    #[inline(always)]
    fn commit(buf: &[f32; CHUNK], dst: &mut [bf16]) {
        // Round to nearest even on the bits (vectorises); NaN stays a quiet NaN.
        for (d, &v) in dst.iter_mut().zip(buf) {
            let x = v.to_bits();
            let rounded = ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16;
            let bits = if v.is_nan() {
                ((x >> 16) as u16) | 0x40
            } else {
                rounded
            };
            *d = bf16::from_bits(bits);
        }
    }
}
