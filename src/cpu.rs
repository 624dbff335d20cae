//! The fused CPU backend.
//!
//! Forward makes one pass over `mean` and `target` producing the per-channel sums of
//! squared differences `Q_c`; the loss is an O(C) epilogue. Backward is one elementwise pass.
//!
//! Every pass is an `Op` applied to each element by one walk over the tensors. Work is cut
//! into fixed units that depend only on the shape (never on the thread count or on timing);
//! each unit writes its partial sums to its own slots and slots are combined in index order,
//! so results are bitwise identical run to run and on any number of threads. Sums are kept in
//! the accumulation type (f32, or f64 for f64 inputs) in several independent lanes, so the
//! loops vectorise, and flushed into f64 at least every `FLUSH` elements per lane. f32 and
//! f64 are read and written in place; f16 and bf16 go through small conversion buffers.
//! Where the CPU has AVX2, the same code is compiled a second time for it and chosen at run
//! time (no fused multiply-add is introduced, so both give the same bits).
//!
//! Per-element outputs of 1 MiB or more come from a small cache of host buffers
//! ([`empty_cache`] releases it): fresh memory costs page faults and zeroing that, for a
//! 16 MB gradient, exceed the pass itself.

use std::ops::{Add, Mul, Neg, Sub};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use tch::{Kind, Tensor};

pub use crate::host_pool::{
    cache_limit, cached_bytes, empty_cache, set_cache_limit, CACHE_LIMIT_ENV, MAX_CACHED_BYTES,
};

use crate::backend::{ForwardOutput, Grads, NeedsGrad};
use crate::error::{Result, VidError};
use crate::host_pool;
use crate::math::ChannelParams;
use crate::options::Reduction;
use crate::validate::{Geometry, Layout, VidProblem};

/// Elements converted at a time for 16-bit inputs, and the longest run handed to an op.
const CHUNK: usize = 512;
/// Independent accumulator lanes of a channels-first run.
const LANES: usize = 16;
/// Elements a lane (or a channels-last channel) accumulates before flushing into f64.
const FLUSH: usize = 64;
/// Target elements per unit of work.
const UNIT_ELEMENTS: usize = 1 << 15;
/// Channels-last units hold at least this many rows, bounding their partials to numel / 64.
const MIN_UNIT_ROWS: usize = 64;
/// Channels-first: each partial sum covers at least this many elements of its channel
/// (several images' rows when rows are short), bounding the partials to numel / 64 (or C).
const MIN_SLOT_ELEMENTS: usize = 64;
/// Below this many elements, one thread does everything.
const PARALLEL_THRESHOLD: usize = 1 << 16;

// ---------------------------------------------------------------------------------------
// Numeric types

/// The arithmetic type elements are computed in.
trait Acc:
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
}

macro_rules! impl_acc {
    ($($t:ty),*) => {$(
        impl Acc for $t {
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    )*};
}
impl_acc!(f32, f64);

/// A storage dtype and its accumulation type.
trait Element: Copy + Send + Sync + 'static {
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
        }
    )*};
}
impl_native_element!(f32, f64);

impl Element for f16 {
    type Acc = f32;
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

// ---------------------------------------------------------------------------------------
// Ops: what a pass does per element

/// Per-channel parameters of an op, one value per channel each.
struct ChannelValues<A> {
    first: Vec<A>,
    second: Vec<A>,
}

impl<A: Acc> ChannelValues<A> {
    /// One parameter per channel (the second is unused, zero).
    fn single(first: impl Iterator<Item = f64>) -> Self {
        let first: Vec<A> = first.map(A::from_f64).collect();
        ChannelValues {
            second: vec![A::default(); first.len()],
            first,
        }
    }

    fn new(first: impl Iterator<Item = f64>, second: impl Iterator<Item = f64>) -> Self {
        ChannelValues {
            first: first.map(A::from_f64).collect(),
            second: second.map(A::from_f64).collect(),
        }
    }
}

/// What a pass computes per element.
trait Op<A: Acc>: Sync {
    /// Per-channel sums the op accumulates (0, 1 or 2).
    const SUMS: usize;
    /// Whether the op reads a per-element upstream gradient.
    const READS_UPSTREAM: bool;
    /// Whether the op writes a per-element result.
    const WRITES: bool;
    /// Given the channel's two parameters, mean, target and upstream values: the result and
    /// the additions to the (up to two) sums.
    fn step(p: A, q: A, m: A, t: A, g: A) -> (A, A, A);
}

/// `Q_c += d^2`.
struct SumSq;
impl<A: Acc> Op<A> for SumSq {
    const SUMS: usize = 1;
    const READS_UPSTREAM: bool = false;
    const WRITES: bool = false;
    #[inline(always)]
    fn step(_: A, _: A, m: A, t: A, _: A) -> (A, A, A) {
        let d = m - t;
        (A::default(), d * d, A::default())
    }
}

/// Per-element loss `p d^2 + q` (p = 0.5 / var, q = 0.5 ln var + constant).
struct ElementLoss;
impl<A: Acc> Op<A> for ElementLoss {
    const SUMS: usize = 0;
    const READS_UPSTREAM: bool = false;
    const WRITES: bool = true;
    #[inline(always)]
    fn step(p: A, q: A, m: A, t: A, _: A) -> (A, A, A) {
        let d = m - t;
        (p * d * d + q, A::default(), A::default())
    }
}

/// Gradient of mean for Mean/Sum: `p d` (p = g k / var).
struct ScaledDifference;
impl<A: Acc> Op<A> for ScaledDifference {
    const SUMS: usize = 0;
    const READS_UPSTREAM: bool = false;
    const WRITES: bool = true;
    #[inline(always)]
    fn step(p: A, _: A, m: A, t: A, _: A) -> (A, A, A) {
        (p * (m - t), A::default(), A::default())
    }
}

/// Gradient of mean for None: `G d p` (p = 1 / var), with `R1 += G`, `R2 += G d^2`.
struct NoneBackward;
impl<A: Acc> Op<A> for NoneBackward {
    const SUMS: usize = 2;
    const READS_UPSTREAM: bool = true;
    const WRITES: bool = true;
    #[inline(always)]
    fn step(p: A, _: A, m: A, t: A, g: A) -> (A, A, A) {
        let d = m - t;
        (g * d * p, g, g * d * d)
    }
}

/// Applies `O` to a run of elements: element j has parameters `p[j]`, `q[j]`. All slices
/// have the run's length (`up`, `out` and the sums only where the op uses them).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply<A: Acc, O: Op<A>>(
    p: &[A],
    q: &[A],
    m: &[A],
    t: &[A],
    up: &[A],
    out: &mut [A],
    sum0: &mut [A],
    sum1: &mut [A],
) {
    let n = m.len();
    let (p, q, m, t) = (&p[..n], &q[..n], &m[..n], &t[..n]);
    let up = if O::READS_UPSTREAM { &up[..n] } else { m };
    let out = if O::WRITES {
        &mut out[..n]
    } else {
        &mut [][..]
    };
    let sum0 = if O::SUMS > 0 {
        &mut sum0[..n]
    } else {
        &mut [][..]
    };
    let sum1 = if O::SUMS > 1 {
        &mut sum1[..n]
    } else {
        &mut [][..]
    };
    for j in 0..n {
        let (r, a0, a1) = O::step(p[j], q[j], m[j], t[j], up[j]);
        if O::WRITES {
            out[j] = r;
        }
        if O::SUMS > 0 {
            sum0[j] = sum0[j] + a0;
        }
        if O::SUMS > 1 {
            sum1[j] = sum1[j] + a1;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Work decomposition

/// A unit of work. Channels-first: channels `channels` of images `batches`, each `(n, c)` row
/// whole, or (`parts_per_row > 1`) elements `begin..end` of one row. Channels-last: rows
/// `rows` of C.
#[derive(Clone, Debug)]
struct Unit {
    index: usize,
    /// Channels-first only.
    batch_block: usize,
    batches: std::ops::Range<usize>,
    channels: std::ops::Range<usize>,
    /// Channels-last only.
    rows: std::ops::Range<usize>,
    part: usize,
    begin: usize,
    end: usize,
}

/// The fixed decomposition of a problem into units, and where their partial sums go.
struct Plan {
    geometry: Geometry,
    /// Channels-first: parts per row (1 unless rows are longer than a unit).
    parts_per_row: usize,
    /// Channels-first: images and channels per unit; short rows take several images so that
    /// a partial covers at least MIN_SLOT_ELEMENTS elements.
    batch_per_unit: usize,
    channels_per_unit: usize,
    /// Channels-last: rows (of C) per unit.
    rows_per_unit: usize,
    units: usize,
}

impl Plan {
    fn new(geometry: Geometry) -> Plan {
        let Geometry {
            batch,
            channels,
            inner,
            layout,
        } = geometry;
        let mut plan = Plan {
            geometry,
            parts_per_row: 1,
            batch_per_unit: 1,
            channels_per_unit: 1,
            rows_per_unit: 1,
            units: 0,
        };
        match layout {
            Layout::ChannelsFirst if inner > UNIT_ELEMENTS => {
                plan.parts_per_row = inner.div_ceil(UNIT_ELEMENTS);
                plan.units = batch * channels * plan.parts_per_row;
            }
            Layout::ChannelsFirst => {
                plan.batch_per_unit = MIN_SLOT_ELEMENTS.div_ceil(inner).min(batch);
                plan.channels_per_unit =
                    (UNIT_ELEMENTS / (plan.batch_per_unit * inner)).clamp(1, channels);
                plan.units = plan.batch_blocks() * channels.div_ceil(plan.channels_per_unit);
            }
            Layout::ChannelsLast => {
                plan.rows_per_unit = UNIT_ELEMENTS.div_ceil(channels).max(MIN_UNIT_ROWS);
                plan.units = (batch * inner).div_ceil(plan.rows_per_unit);
            }
        }
        plan
    }

    /// Channels-first: groups of `batch_per_unit` images.
    fn batch_blocks(&self) -> usize {
        self.geometry.batch.div_ceil(self.batch_per_unit)
    }

    fn unit(&self, index: usize) -> Unit {
        let g = &self.geometry;
        let mut unit = Unit {
            index,
            batch_block: 0,
            batches: 0..0,
            channels: 0..0,
            rows: 0..0,
            part: 0,
            begin: 0,
            end: 0,
        };
        match g.layout {
            Layout::ChannelsFirst if self.parts_per_row > 1 => {
                let (row, part) = (index / self.parts_per_row, index % self.parts_per_row);
                let (n, c) = (row / g.channels, row % g.channels);
                unit.batch_block = n;
                unit.batches = n..n + 1;
                unit.channels = c..c + 1;
                unit.part = part;
                unit.begin = part * UNIT_ELEMENTS;
                unit.end = (unit.begin + UNIT_ELEMENTS).min(g.inner);
            }
            Layout::ChannelsFirst => {
                let channel_blocks = g.channels.div_ceil(self.channels_per_unit);
                let (block, cb) = (index / channel_blocks, index % channel_blocks);
                let first_n = block * self.batch_per_unit;
                let first_c = cb * self.channels_per_unit;
                unit.batch_block = block;
                unit.batches = first_n..(first_n + self.batch_per_unit).min(g.batch);
                unit.channels = first_c..(first_c + self.channels_per_unit).min(g.channels);
                unit.end = g.inner;
            }
            Layout::ChannelsLast => {
                let first = index * self.rows_per_unit;
                unit.rows = first..(first + self.rows_per_unit).min(g.batch * g.inner);
                unit.end = g.channels;
            }
        }
        unit
    }

    /// Partial-sum slots per sum. Channels-first: one per (image block, channel, part), slot
    /// `(block * C + c) * parts_per_row + part`; channels-last: C per unit.
    fn slots(&self) -> usize {
        match self.geometry.layout {
            Layout::ChannelsFirst => {
                self.batch_blocks() * self.geometry.channels * self.parts_per_row
            }
            Layout::ChannelsLast => self.units * self.geometry.channels,
        }
    }

    /// Adds one plane of partials into per-channel f64 sums, in slot order.
    fn combine(&self, plane: &[f64]) -> Vec<f64> {
        let channels = self.geometry.channels;
        let mut sums = vec![0.0f64; channels];
        match self.geometry.layout {
            Layout::ChannelsFirst => {
                for (slot, v) in plane.iter().enumerate() {
                    sums[(slot / self.parts_per_row) % channels] += v;
                }
            }
            Layout::ChannelsLast => {
                for unit in plane.chunks_exact(channels) {
                    sums.iter_mut().zip(unit).for_each(|(s, v)| *s += v);
                }
            }
        }
        sums
    }

    /// Runs `work` on every unit, on all cores when it pays.
    fn for_each_unit<W: UnitWork>(&self, work: &W) {
        let threads = if self.geometry.numel() < PARALLEL_THRESHOLD {
            1
        } else {
            worker_threads()
        };
        // Hand out runs of units totalling about UNIT_ELEMENTS, to keep small units cheap.
        let unit_len = (self.geometry.numel() / self.units).max(1);
        let batch = (UNIT_ELEMENTS / unit_len).max(1);
        let avx2 = has_avx2();
        let next = AtomicUsize::new(0);
        let worker = || loop {
            let first = next.fetch_add(batch, Ordering::Relaxed);
            if first >= self.units {
                break;
            }
            for index in first..(first + batch).min(self.units) {
                let unit = self.unit(index);
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2 (checked at run time).
                    unsafe { run_avx2(work, &unit) };
                    continue;
                }
                work.run(&unit);
            }
        };
        if threads <= 1 {
            worker();
        } else {
            // On libtorch's own pool: its OpenMP workers spin for a while after each of
            // libtorch's parallel ops, and threads of our own would compete with them.
            crate::autograd::parallel_for(threads, &|_| worker());
        }
    }
}

/// libtorch's intra-op thread count (`tch::set_num_threads` sets it).
fn worker_threads() -> usize {
    tch::get_num_threads().max(1) as usize
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The work of a pass on one unit.
trait UnitWork: Sync {
    fn run(&self, unit: &Unit);
}

/// The same work compiled for AVX2 (the loops it inlines get 256-bit vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<W: UnitWork>(work: &W, unit: &Unit) {
    work.run(unit)
}

/// A raw pointer that units write through at disjoint ranges.
struct SharedMut<T>(*mut T);
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    fn new(slice: &mut [T]) -> Self {
        SharedMut(slice.as_mut_ptr())
    }
    /// SAFETY: the caller guarantees `start..start + len` is in bounds and that no other
    /// live slice overlaps it.
    unsafe fn slice<'x>(self, start: usize, len: usize) -> &'x mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

// ---------------------------------------------------------------------------------------
// A pass: one op over every element

/// The tensors of a pass. `upstream` is empty unless the op reads it.
struct Walk<'a, E: Element, O> {
    plan: &'a Plan,
    params: &'a ChannelValues<E::Acc>,
    mean: &'a [E],
    target: &'a [E],
    upstream: &'a [E],
    out: Option<SharedMut<E>>,
    out_negated: Option<SharedMut<E>>,
    /// `O::SUMS` planes of `plan.slots()` partial sums.
    partials: SharedMut<f64>,
    op: std::marker::PhantomData<O>,
}

impl<E: Element, O: Op<E::Acc>> UnitWork for Walk<'_, E, O> {
    #[inline(always)]
    fn run(&self, unit: &Unit) {
        // Conversion buffers, initialised once per unit (not per chunk).
        let mut bufs = [[E::Acc::default(); CHUNK]; 5];
        match self.plan.geometry.layout {
            Layout::ChannelsFirst => self.channels_first(unit, &mut bufs),
            Layout::ChannelsLast => self.channels_last(unit, &mut bufs),
        }
    }
}

/// Stack buffers of a unit: mean, target, upstream, output, negated output.
type Buffers<A> = [[A; CHUNK]; 5];

/// The per-element views of one chunk (at most CHUNK elements) of a pass.
struct ChunkIo<'b, A> {
    m: &'b [A],
    t: &'b [A],
    up: &'b [A],
    out: &'b mut [A],
}

impl<E: Element, O: Op<E::Acc>> Walk<'_, E, O> {
    /// The views of elements `at..at + n`: inputs converted (or borrowed), and where to
    /// compute results. (Not a closure-taking helper: closures would not be inlined into the
    /// AVX2 copy of the pass.)
    #[inline(always)]
    fn load_chunk<'b>(
        &'b self,
        bufs: &'b mut Buffers<E::Acc>,
        at: usize,
        n: usize,
    ) -> ChunkIo<'b, E::Acc> {
        let [mb, tb, ub, ob, _] = bufs;
        let m = E::view(&self.mean[at..at + n], mb);
        let t = E::view(&self.target[at..at + n], tb);
        let up = if O::READS_UPSTREAM {
            E::view(&self.upstream[at..at + n], ub)
        } else {
            m
        };
        // SAFETY (here and in finish_chunk): units cover disjoint element ranges.
        let out = match self.out.filter(|_| O::WRITES) {
            Some(o) => E::out_view(unsafe { o.slice(at, n) }, ob),
            None => &mut ob[..n],
        };
        ChunkIo { m, t, up, out }
    }

    /// Stores the results computed in `load_chunk`'s output view (and their negation).
    #[inline(always)]
    fn finish_chunk(&self, bufs: &mut Buffers<E::Acc>, at: usize, n: usize) {
        if !O::WRITES {
            return;
        }
        let [_, _, _, ob, nb] = bufs;
        let mut dst = self.out.map(|o| unsafe { o.slice(at, n) });
        let values = match dst.as_deref_mut() {
            Some(d) => E::out_view(d, ob),
            None => &mut ob[..n],
        };
        self.store_negated(at, values, nb);
        if let Some(d) = dst {
            E::commit(ob, d);
        }
    }

    /// Writes `-values` to the negated output, if any.
    #[inline(always)]
    fn store_negated(&self, at: usize, values: &[E::Acc], buf: &mut [E::Acc; CHUNK]) {
        if let Some(neg) = self.out_negated.filter(|_| O::WRITES) {
            let dst = unsafe { neg.slice(at, values.len()) };
            for (d, &v) in E::out_view(dst, buf).iter_mut().zip(values) {
                *d = -v;
            }
            E::commit(buf, unsafe { neg.slice(at, values.len()) });
        }
    }

    /// Writes one slot of each of the op's partial-sum planes.
    #[inline(always)]
    fn write_partials(&self, slot: usize, totals: &[f64]) {
        let slots = self.plan.slots();
        for (k, total) in totals.iter().enumerate().take(O::SUMS) {
            // SAFETY: each slot belongs to one unit.
            unsafe { self.partials.slice(k * slots + slot, 1)[0] = *total };
        }
    }

    /// Channels-first: each row (part) is one channel; LANES accumulators per sum, flushed
    /// at the end of every row; one partial per channel of the unit.
    #[inline(always)]
    fn channels_first(&self, unit: &Unit, bufs: &mut Buffers<E::Acc>) {
        let g = &self.plan.geometry;
        for c in unit.channels.clone() {
            let (p, q) = (
                [self.params.first[c]; LANES],
                [self.params.second[c]; LANES],
            );
            let mut lanes = [[E::Acc::default(); LANES]; 2];
            let mut totals = [0.0f64; 2];
            for n in unit.batches.clone() {
                let row = n * g.channels + c;
                let (mut at, end) = (row * g.inner + unit.begin, row * g.inner + unit.end);
                let mut since_flush = 0;
                while at < end {
                    let n = CHUNK.min(end - at);
                    {
                        let mut io = self.load_chunk(bufs, at, n);
                        let [l0, l1] = &mut lanes;
                        let full = n / LANES * LANES;
                        for b in (0..full).step_by(LANES) {
                            // Fixed-length blocks: the loop in `apply` becomes straight vector code.
                            apply_lanes::<_, O>(&p, &q, &mut io, b..b + LANES, l0, l1);
                        }
                        if full < n {
                            apply_lanes::<_, O>(&p, &q, &mut io, full..n, l0, l1);
                        }
                    }
                    self.finish_chunk(bufs, at, n);
                    at += n;
                    since_flush += n;
                    if O::SUMS > 0 && (since_flush >= FLUSH * LANES || at == end) {
                        flush(&mut lanes, &mut totals);
                        since_flush = 0;
                    }
                }
            }
            if O::SUMS > 0 {
                let slot = (unit.batch_block * g.channels + c) * self.plan.parts_per_row;
                self.write_partials(slot + unit.part, &totals);
            }
        }
    }

    /// Channels-last: rows of C, walked as tiles of whole rows (C <= CHUNK) or as pieces of a
    /// row; the parameters and accumulators are laid out like a tile, so every loop is
    /// contiguous.
    #[inline(always)]
    fn channels_last(&self, unit: &Unit, bufs: &mut Buffers<E::Acc>) {
        let channels = self.plan.geometry.channels;
        let tile = if channels <= CHUNK {
            CHUNK / channels * channels
        } else {
            channels
        };
        let repeat =
            |v: &[E::Acc]| -> Vec<E::Acc> { v.iter().copied().cycle().take(tile).collect() };
        let (tp, tq) = (repeat(&self.params.first), repeat(&self.params.second));
        let sums = if O::SUMS > 0 { tile } else { 0 };
        let mut work = [vec![E::Acc::default(); sums], vec![E::Acc::default(); sums]];
        let mut totals = [vec![0.0f64; channels], vec![0.0f64; channels]];
        let (mut at, end) = (unit.rows.start * channels, unit.rows.end * channels);
        let mut passes = 0;
        while at < end {
            let offset = (at - unit.rows.start * channels) % tile;
            let n = CHUNK.min(tile - offset).min(end - at);
            let r = offset..offset + n;
            {
                let io = self.load_chunk(bufs, at, n);
                let [w0, w1] = &mut work;
                let (w0, w1) = if O::SUMS > 0 {
                    (&mut w0[r.clone()], &mut w1[r.clone()])
                } else {
                    (&mut [][..], &mut [][..])
                };
                apply::<_, O>(
                    &tp[r.clone()],
                    &tq[r.clone()],
                    io.m,
                    io.t,
                    io.up,
                    io.out,
                    w0,
                    w1,
                );
            }
            self.finish_chunk(bufs, at, n);
            at += n;
            if offset + n == tile {
                passes += 1;
            }
            if O::SUMS > 0 && (passes == FLUSH || at == end) {
                for (total, w) in totals.iter_mut().zip(work.iter_mut()).take(O::SUMS) {
                    for (i, v) in w.iter_mut().enumerate() {
                        total[i % channels] += v.to_f64();
                        *v = E::Acc::default();
                    }
                }
                passes = 0;
            }
        }
        if O::SUMS > 0 {
            let slots = self.plan.slots();
            for (k, total) in totals.iter().enumerate().take(O::SUMS) {
                // SAFETY: unit u owns slots u * C..(u + 1) * C of each plane.
                let dst = unsafe {
                    self.partials
                        .slice(k * slots + unit.index * channels, channels)
                };
                dst.copy_from_slice(total);
            }
        }
    }
}

/// `apply` on elements `r` (at most LANES) of a chunk, accumulating into the lanes.
#[inline(always)]
fn apply_lanes<A: Acc, O: Op<A>>(
    p: &[A; LANES],
    q: &[A; LANES],
    io: &mut ChunkIo<'_, A>,
    r: std::ops::Range<usize>,
    l0: &mut [A; LANES],
    l1: &mut [A; LANES],
) {
    let (m, t) = (&io.m[r.clone()], &io.t[r.clone()]);
    let up = if O::READS_UPSTREAM {
        &io.up[r.clone()]
    } else {
        m
    };
    let out: &mut [A] = if O::WRITES {
        &mut io.out[r]
    } else {
        &mut [][..]
    };
    apply::<_, O>(p, q, m, t, up, out, l0, l1);
}

/// Moves lane sums into f64 totals, in lane order.
#[inline(always)]
fn flush<A: Acc>(lanes: &mut [[A; LANES]; 2], totals: &mut [f64; 2]) {
    for (total, lane) in totals.iter_mut().zip(lanes.iter_mut()) {
        for v in lane.iter_mut() {
            *total += v.to_f64();
            *v = A::default();
        }
    }
}

/// Runs op `O` over the whole problem; returns its per-channel sums (`O::SUMS` of them).
fn run_pass<E: Element, O: Op<E::Acc>>(
    plan: &Plan,
    params: &ChannelValues<E::Acc>,
    inputs: [&[E]; 3],
    out: Option<&mut [E]>,
    out_negated: Option<&mut [E]>,
) -> Vec<Vec<f64>> {
    let mut partials = vec![0.0f64; plan.slots() * O::SUMS];
    let walk = Walk::<E, O> {
        plan,
        params,
        mean: inputs[0],
        target: inputs[1],
        upstream: inputs[2],
        out: out.map(SharedMut::new),
        out_negated: out_negated.map(SharedMut::new),
        partials: SharedMut::new(&mut partials),
        op: std::marker::PhantomData,
    };
    plan.for_each_unit(&walk);
    partials
        .chunks_exact(plan.slots().max(1))
        .take(O::SUMS)
        .map(|plane| plan.combine(plane))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Entry points

/// Borrows a CPU tensor's elements. The tensor must be dense in the problem's layout.
fn elements<E: Element>(t: &Tensor) -> &[E] {
    // SAFETY: validation made `t` a dense CPU tensor of dtype E with numel elements starting
    // at data_ptr; it outlives the borrow.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const E, t.numel()) }
}

fn elements_mut<E: Element>(t: &mut Tensor) -> &mut [E] {
    // SAFETY: as above; `t` was freshly allocated by us and is not aliased.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut E, t.numel()) }
}

/// Calls `$body` with `$E` bound to the storage type of `$kind`.
macro_rules! dispatch_dtype {
    ($kind:expr, $E:ident => $body:expr) => {
        match $kind {
            Kind::Float => {
                type $E = f32;
                $body
            }
            Kind::Double => {
                type $E = f64;
                $body
            }
            Kind::Half => {
                type $E = f16;
                $body
            }
            Kind::BFloat16 => {
                type $E = bf16;
                $body
            }
            other => Err(VidError::invalid(
                "mean",
                format!("unsupported dtype {other:?}"),
            )),
        }
    };
}

fn channel_params(problem: &VidProblem) -> Result<ChannelParams> {
    let alpha = Vec::<f64>::try_from(&problem.log_scale.f_to_kind(Kind::Double)?)?;
    Ok(ChannelParams::new(&alpha, problem.options.eps_value()))
}

/// Parameters of the per-element loss: `0.5 / var` and `0.5 ln var + constant`.
fn loss_params<A: Acc>(params: &ChannelParams, constant: f64) -> ChannelValues<A> {
    ChannelValues::new(
        params.var.iter().map(|v| 0.5 / v),
        params.ln_var.iter().map(|l| 0.5 * l + constant),
    )
}

/// SumSq uses no parameters.
fn unused_params<A: Acc>(channels: usize) -> ChannelValues<A> {
    ChannelValues::single(std::iter::repeat(0.0).take(channels))
}

/// A CPU scalar of `kind` holding `value` rounded as a cast does: a value beyond the dtype's
/// range becomes +-inf, as plain tch ops give (`scalar_tensor` refuses it instead).
fn scalar_of_kind(value: f64, kind: Kind) -> Result<Tensor> {
    let scalar = match kind {
        Kind::Double => Tensor::from(value),
        _ => Tensor::from(value as f32),
    };
    Ok(scalar.f_to_kind(kind)?)
}

/// Fused CPU forward.
pub(crate) fn forward(problem: &VidProblem) -> Result<ForwardOutput> {
    let plan = Plan::new(problem.geometry);
    let params = channel_params(problem)?;
    let opts = &problem.options;
    dispatch_dtype!(problem.kind(), E => {
        let inputs = [elements::<E>(&problem.mean), elements::<E>(&problem.target), &[][..]];
        match opts.reduction_mode() {
            Reduction::None => {
                let mut loss = host_pool::empty_like(&problem.mean)?;
                let values = loss_params(&params, params.constant(opts));
                run_pass::<E, ElementLoss>(&plan, &values, inputs, Some(elements_mut(&mut loss)), None);
                Ok(ForwardOutput { loss, channel_sumsq: None })
            }
            reduction => {
                let unused = unused_params(problem.geometry.channels);
                let q = run_pass::<E, SumSq>(&plan, &unused, inputs, None, None).remove(0);
                let value = params.reduced_loss(&q, &problem.geometry, opts, reduction);
                let loss = scalar_of_kind(value, problem.kind())?;
                Ok(ForwardOutput { loss, channel_sumsq: Some(Tensor::from_slice(&q)) })
            }
        }
    })
}

/// Fused CPU backward.
pub(crate) fn backward(
    problem: &VidProblem,
    channel_sumsq: Option<&Tensor>,
    grad: &Tensor,
    needs: NeedsGrad,
) -> Result<Grads> {
    let plan = Plan::new(problem.geometry);
    let params = channel_params(problem)?;
    let opts = &problem.options;
    let mut grads = Grads::default();
    let new_output = |needed: bool| -> Result<Option<Tensor>> {
        needed
            .then(|| host_pool::empty_like(&problem.mean))
            .transpose()
    };
    let (mut grad_mean, mut grad_target) = (new_output(needs.mean)?, new_output(needs.target)?);
    dispatch_dtype!(problem.kind(), E => {
        let (mean, target) = (elements::<E>(&problem.mean), elements::<E>(&problem.target));
        let out = grad_mean.as_mut().map(elements_mut::<E>);
        let out_negated = grad_target.as_mut().map(elements_mut::<E>);
        match opts.reduction_mode() {
            Reduction::None => {
                let upstream = problem.f_in_layout(&grad.f_to_kind(problem.kind())?)?;
                let inputs = [mean, target, elements::<E>(&upstream)];
                let inv_var = ChannelValues::single(params.var.iter().map(|v| 1.0 / v));
                let r = run_pass::<E, NoneBackward>(&plan, &inv_var, inputs, out, out_negated);
                if needs.log_scale {
                    grads.log_scale = Some(Tensor::from_slice(&params.log_scale_grad_none(&r[0], &r[1])));
                }
            }
            reduction => {
                let q = channel_sumsq.ok_or_else(|| VidError::Autograd("missing saved sums".into()))?;
                let q = Vec::<f64>::try_from(q)?;
                let upstream = grad.f_to_kind(Kind::Double)?.f_double_value(&[])?;
                let k = upstream * params.reduction_factor(&problem.geometry, reduction);
                if out.is_some() || out_negated.is_some() {
                    let scale = ChannelValues::single(params.var.iter().map(|v| k / v));
                    run_pass::<E, ScaledDifference>(&plan, &scale, [mean, target, &[][..]], out, out_negated);
                }
                if needs.log_scale {
                    let m = problem.geometry.per_channel() as f64;
                    grads.log_scale = Some(Tensor::from_slice(&params.log_scale_grad(&q, m, k)));
                }
            }
        }
        Ok::<(), VidError>(())
    })?;
    grads.mean = grad_mean;
    grads.target = grad_target;
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(batch: usize, channels: usize, inner: usize, layout: Layout) -> Geometry {
        Geometry {
            batch,
            channels,
            inner,
            layout,
        }
    }

    /// Partial sums stay a small fraction of the inputs: at most numel / 64 per plane (or C
    /// when there are fewer than 64 elements per channel), 1/16 of two bf16 inputs' bytes
    /// with both planes of f64. Short NCHW rows once had one partial per (n, c) row.
    #[test]
    fn partials_are_bounded_by_the_input_size() {
        let cases = [
            geometry(2048, 24414, 2, Layout::ChannelsFirst),
            geometry(4096, 1000, 3, Layout::ChannelsFirst),
            geometry(64, 256, 49, Layout::ChannelsFirst),
            geometry(256, 512, 64, Layout::ChannelsFirst),
            geometry(1, 100_000, 2, Layout::ChannelsFirst),
            geometry(3, 5, 100_000, Layout::ChannelsFirst),
            geometry(8192, 32000, 1, Layout::ChannelsLast),
            geometry(64, 3, 1024, Layout::ChannelsLast),
            geometry(7, 1, 1, Layout::ChannelsLast),
        ];
        for g in cases {
            let plan = Plan::new(g);
            let bound = (g.numel() / MIN_SLOT_ELEMENTS).max(g.channels);
            assert!(
                plan.slots() <= bound,
                "{g:?}: {} partial slots, bound {bound}",
                plan.slots()
            );
        }
    }

    /// Every element belongs to exactly one unit, and every slot to exactly one unit.
    #[test]
    fn units_cover_every_element_and_slot_once() {
        for g in [
            geometry(5, 7, 3, Layout::ChannelsFirst),
            geometry(130, 3, 2, Layout::ChannelsFirst),
            geometry(2, 3, 70_000, Layout::ChannelsFirst),
            geometry(9, 700, 50, Layout::ChannelsFirst),
            geometry(300, 5, 7, Layout::ChannelsLast),
        ] {
            let plan = Plan::new(g);
            let mut elements = vec![0u8; g.numel()];
            let mut slots = vec![0u8; plan.slots()];
            for index in 0..plan.units {
                let u = plan.unit(index);
                match g.layout {
                    Layout::ChannelsFirst => {
                        for c in u.channels.clone() {
                            for n in u.batches.clone() {
                                let row = n * g.channels + c;
                                let range = row * g.inner + u.begin..row * g.inner + u.end;
                                elements[range].iter_mut().for_each(|k| *k += 1);
                            }
                            let slot = (u.batch_block * g.channels + c) * plan.parts_per_row;
                            slots[slot + u.part] += 1;
                        }
                    }
                    Layout::ChannelsLast => {
                        let range = u.rows.start * g.channels..u.rows.end * g.channels;
                        elements[range].iter_mut().for_each(|k| *k += 1);
                        let range = u.index * g.channels..(u.index + 1) * g.channels;
                        slots[range].iter_mut().for_each(|k| *k += 1);
                    }
                }
            }
            assert!(elements.iter().all(|&k| k == 1), "{g:?}: elements");
            assert!(slots.iter().all(|&k| k == 1), "{g:?}: slots");
        }
    }
}
