//! A pass: one op applied to every element by one walk over the tensors, unit by unit.

use super::element::{Acc, Buffers, Element, CHUNK};
use super::ops::{apply, ChannelValues, Op};
use super::plan::{run_units, Plan, Unit, UnitWork};
use crate::validate::Layout;

/// Independent accumulator lanes of a channels-first run.
const LANES: usize = 16;
/// Elements a lane (or a channels-last channel) accumulates before flushing into f64.
const FLUSH: usize = 64;

// A pass: one op over every element

/// The tensors of a pass. `upstream` is empty unless the op reads it.
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
    pub(super) fn new(slice: &mut [T]) -> Self {
        SharedMut(slice.as_mut_ptr())
    }
    /// SAFETY: the caller guarantees `start..start + len` is in bounds and that no other
    /// live slice overlaps it.
    unsafe fn slice<'x>(self, start: usize, len: usize) -> &'x mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

pub(super) struct Walk<'a, E: Element, O> {
    plan: Plan,
    params: ChannelValues<E::Acc>,
    mean: &'a [E],
    target: &'a [E],
    upstream: &'a [E],
    out: Option<SharedMut<E>>,
    out_negated: Option<SharedMut<E>>,
    /// `O::SUMS` planes of `plan.slots()` partial sums, written by the units through
    /// `partials_at` (the Vec's heap buffer never moves: it is not touched while units run).
    partials: Vec<f64>,
    partials_at: SharedMut<f64>,
    /// Channels-last: the parameters laid out like a tile of whole rows (computed once per
    /// pass, not per unit), so that every loop over a tile is contiguous.
    tiled: ChannelValues<E::Acc>,
    op: std::marker::PhantomData<O>,
}

impl<'a, E: Element, O: Op<E::Acc>> Walk<'a, E, O> {
    /// A pass of `O` over `inputs` (mean, target, upstream: empty unless the op reads it),
    /// writing to `out` (and its negation to `out_negated`) when the op writes.
    pub(super) fn new(
        plan: Plan,
        params: ChannelValues<E::Acc>,
        inputs: [&'a [E]; 3],
        out: Option<&'a mut [E]>,
        out_negated: Option<&'a mut [E]>,
    ) -> Self {
        let mut partials = vec![0.0f64; plan.slots() * O::SUMS];
        let partials_at = SharedMut::new(&mut partials);
        let tiled = match plan.geometry.layout {
            Layout::ChannelsLast => {
                let channels = plan.geometry.channels;
                let tile = if channels <= CHUNK {
                    CHUNK / channels * channels
                } else {
                    channels
                };
                let repeat = |v: &[E::Acc]| v.iter().copied().cycle().take(tile).collect();
                ChannelValues {
                    first: repeat(&params.first),
                    second: repeat(&params.second),
                }
            }
            Layout::ChannelsFirst => ChannelValues {
                first: Vec::new(),
                second: Vec::new(),
            },
        };
        Walk {
            tiled,
            plan,
            params,
            mean: inputs[0],
            target: inputs[1],
            upstream: inputs[2],
            out: out.map(SharedMut::new),
            out_negated: out_negated.map(SharedMut::new),
            partials,
            partials_at,
            op: std::marker::PhantomData,
        }
    }
}

/// A pass whose per-channel sums are read after its units ran.
pub(super) trait SummingWork: UnitWork {
    /// The op's per-channel sums (`O::SUMS` vectors of C), combined in slot order.
    fn sums(&self) -> Vec<Vec<f64>>;
    /// This pass as the work of a parallel region.
    fn as_unit_work(&self) -> &dyn UnitWork;
}

impl<E: Element, O: Op<E::Acc>> SummingWork for Walk<'_, E, O> {
    fn as_unit_work(&self) -> &dyn UnitWork {
        self
    }

    fn sums(&self) -> Vec<Vec<f64>> {
        self.partials
            .chunks_exact(self.plan.slots().max(1))
            .take(O::SUMS)
            .map(|plane| self.plan.combine(plane))
            .collect()
    }
}

impl<E: Element, O: Op<E::Acc>> UnitWork for Walk<'_, E, O> {
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn run_unit(&self, index: usize, avx2: bool) {
        let unit = self.plan.unit(index);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the caller checked that the CPU has AVX2.
            unsafe { run_avx2(self, &unit) };
            return;
        }
        let _ = avx2;
        self.run(&unit);
    }
}

/// The same walk compiled for AVX2 (the loops it inlines get 256-bit vectors). Generic, not
/// a closure: a closure's body would be compiled without the feature.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<E: Element, O: Op<E::Acc>>(walk: &Walk<'_, E, O>, unit: &Unit) {
    walk.run(unit)
}

impl<E: Element, O: Op<E::Acc>> Walk<'_, E, O> {
    #[inline(always)]
    fn run(&self, unit: &Unit) {
        // Conversion buffers, initialised once per unit (not per chunk).
        // SAFETY: this thread's buffers; no other unit runs on this thread meanwhile.
        let bufs = unsafe { &mut *E::Acc::scratch() };
        match self.plan.geometry.layout {
            Layout::ChannelsFirst => self.channels_first(unit, bufs),
            Layout::ChannelsLast => self.channels_last(unit, bufs),
        }
    }
}

/// The per-element views of one chunk (at most CHUNK elements) of a pass.
pub(super) struct ChunkIo<'b, A> {
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
            unsafe { self.partials_at.slice(k * slots + slot, 1)[0] = *total };
        }
    }

    /// Channels-first: each row (part) is one channel; LANES accumulators per sum, flushed
    /// at the end of every row; one partial per channel of the unit.
    #[inline(always)]
    fn channels_first(&self, unit: &Unit, bufs: &mut Buffers<E::Acc>) {
        let g = &self.plan.geometry;
        if unit.batches.len() == 1 && 2 * g.inner <= CHUNK && self.plan.parts_per_row == 1 {
            return self.short_rows(unit, bufs);
        }
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

    /// Channels-first rows shorter than half a chunk, of one image: its rows for the unit's
    /// channels lie back to back, so a chunk takes several whole rows at once (one
    /// conversion and one store per chunk, not per row: for 16-bit inputs with rows of 64
    /// elements the per-row overhead was most of the pass). Each row is walked exactly as
    /// [`Walk::channels_first`] walks it (the same lane blocks from the row's start, flushed at
    /// its end), so the results are the same bits.
    #[inline(always)]
    fn short_rows(&self, unit: &Unit, bufs: &mut Buffers<E::Acc>) {
        let g = &self.plan.geometry;
        let (s, n) = (g.inner, unit.batches.start);
        let rows_per_chunk = CHUNK / s;
        let full = s / LANES * LANES;
        let mut c = unit.channels.start;
        while c < unit.channels.end {
            let rows = rows_per_chunk.min(unit.channels.end - c);
            let at = (n * g.channels + c) * s;
            {
                let mut io = self.load_chunk(bufs, at, rows * s);
                for r in 0..rows {
                    let ch = c + r;
                    let (p, q) = (
                        [self.params.first[ch]; LANES],
                        [self.params.second[ch]; LANES],
                    );
                    let mut lanes = [[E::Acc::default(); LANES]; 2];
                    let [l0, l1] = &mut lanes;
                    let base = r * s;
                    for b in (base..base + full).step_by(LANES) {
                        apply_lanes::<_, O>(&p, &q, &mut io, b..b + LANES, l0, l1);
                    }
                    if full < s {
                        apply_lanes::<_, O>(&p, &q, &mut io, base + full..base + s, l0, l1);
                    }
                    if O::SUMS > 0 {
                        let mut totals = [0.0f64; 2];
                        flush(&mut lanes, &mut totals);
                        let slot = (unit.batch_block * g.channels + ch) * self.plan.parts_per_row;
                        self.write_partials(slot + unit.part, &totals);
                    }
                }
            }
            self.finish_chunk(bufs, at, rows * s);
            c += rows;
        }
    }

    /// Channels-last: rows of C, walked as tiles of whole rows (C <= CHUNK) or as pieces of a
    /// row; the parameters and accumulators are laid out like a tile, so every loop is
    /// contiguous.
    #[inline(always)]
    fn channels_last(&self, unit: &Unit, bufs: &mut Buffers<E::Acc>) {
        let channels = self.plan.geometry.channels;
        let (tp, tq) = (&self.tiled.first, &self.tiled.second);
        let tile = tp.len();
        let sums = if O::SUMS > 0 { tile } else { 0 };
        let mut work = [vec![E::Acc::default(); sums], vec![E::Acc::default(); sums]];
        let total_len = if O::SUMS > 0 { channels } else { 0 };
        let mut totals = [vec![0.0f64; total_len], vec![0.0f64; total_len]];
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
                // The tile is whole rows of C: add row by row (no per-element modulo).
                for (total, w) in totals.iter_mut().zip(work.iter_mut()).take(O::SUMS) {
                    for row in w.chunks_exact(channels) {
                        total
                            .iter_mut()
                            .zip(row)
                            .for_each(|(t, v)| *t += v.to_f64());
                    }
                    w.fill(E::Acc::default());
                }
                passes = 0;
            }
        }
        if O::SUMS > 0 {
            let slots = self.plan.slots();
            for (k, total) in totals.iter().enumerate().take(O::SUMS) {
                // SAFETY: unit u owns slots u * C..(u + 1) * C of each plane.
                let dst = unsafe {
                    self.partials_at
                        .slice(k * slots + unit.index * channels, channels)
                };
                dst.copy_from_slice(total);
            }
        }
    }
}

/// `apply` on elements `r` (at most LANES) of a chunk, accumulating into the lanes.
#[inline(always)]
pub(super) fn apply_lanes<A: Acc, O: Op<A>>(
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
pub(super) fn flush<A: Acc>(lanes: &mut [[A; LANES]; 2], totals: &mut [f64; 2]) {
    for (total, lane) in totals.iter_mut().zip(lanes.iter_mut()) {
        for v in lane.iter_mut() {
            *total += v.to_f64();
            *v = A::default();
        }
    }
}

/// Runs op `O` over the whole problem; returns its per-channel sums (`O::SUMS` of them).
pub(super) fn run_pass<E: Element, O: Op<E::Acc>>(
    plan: Plan,
    params: ChannelValues<E::Acc>,
    inputs: [&[E]; 3],
    out: Option<&mut [E]>,
    out_negated: Option<&mut [E]>,
) -> Vec<Vec<f64>> {
    let walk = Walk::<E, O>::new(plan, params, inputs, out, out_negated);
    run_units(&[&walk]);
    walk.sums()
}
