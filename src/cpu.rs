//! The fused CPU backend.
//!
//! Forward makes one pass over `mean` and `target` producing the per-channel sums of
//! squared differences `Q_c`; the loss is an O(C) epilogue. Backward is one elementwise pass.
//!
//! Work is cut into fixed units that depend only on the shape (never on the thread count or
//! on timing); each unit's partial result is stored by unit index and partials are combined
//! in index order, so results are bitwise identical run to run and on any number of threads.
//! Inside a unit, elements go through stack buffers of [`CHUNK`] values in the accumulation
//! type (f32, or f64 for f64 inputs) with one accumulator per buffer slot, so the compiler
//! vectorises the loops; slot accumulators are flushed into f64 every [`FLUSH_CHUNKS`] chunks.

use std::ops::{Add, Mul, Sub};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use tch::{Kind, Tensor};

use crate::backend::{ForwardOutput, Grads, NeedsGrad};
use crate::error::{Result, VidError};
use crate::math::ChannelParams;
use crate::options::Reduction;
use crate::validate::{Geometry, Layout, VidProblem};

/// Elements per stack buffer.
const CHUNK: usize = 256;
/// Chunks accumulated in the working precision before flushing into f64.
const FLUSH_CHUNKS: usize = 64;
/// Target elements per unit of work.
const UNIT_ELEMENTS: usize = 1 << 15;
/// Channels-last units hold at least this many rows, bounding the per-unit partials to
/// numel / 64 values.
const MIN_UNIT_ROWS: usize = 64;
/// Below this many elements, one thread does everything.
const PARALLEL_THRESHOLD: usize = 1 << 16;

/// The arithmetic type elements are computed in.
trait Acc:
    Copy + Default + Send + Sync + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self>
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

/// A storage dtype: converts slices to and from its accumulation type.
trait Element: Copy + Send + Sync + 'static {
    type Acc: Acc;
    fn load(src: &[Self], dst: &mut [Self::Acc]);
    fn store(src: &[Self::Acc], dst: &mut [Self]);
}
/// f32 and f64 are their own accumulation types.
macro_rules! impl_native_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            type Acc = $t;
            fn load(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
            fn store(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
        }
    )*};
}
impl_native_element!(f32, f64);
impl Element for f16 {
    type Acc = f32;
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src)
    }
}
impl Element for bf16 {
    type Acc = f32;
    fn load(src: &[bf16], dst: &mut [f32]) {
        // Exact: bf16 is the top half of an f32 (this form vectorises).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn store(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src)
    }
}

// ---------------------------------------------------------------------------------------
// Work decomposition

/// A unit of work: a run of elements that share a channel (channels-first), or a block of
/// whole rows of C (channels-last).
#[derive(Clone, Copy)]
struct Unit {
    /// Index of the first element.
    start: usize,
    /// Number of elements.
    len: usize,
    /// The channel of every element (channels-first); unused for channels-last.
    channel: usize,
}

/// The fixed decomposition of a problem into units.
struct Plan {
    geometry: Geometry,
    /// Channels-first: units per `(n, c)` row.
    units_per_row: usize,
    /// Channels-last: rows of C per unit.
    rows_per_unit: usize,
    units: usize,
}

impl Plan {
    fn new(geometry: Geometry) -> Plan {
        let rows = geometry.batch * geometry.inner;
        match geometry.layout {
            Layout::ChannelsFirst => {
                let units_per_row = geometry.inner.div_ceil(UNIT_ELEMENTS);
                Plan {
                    geometry,
                    units_per_row,
                    rows_per_unit: 0,
                    units: geometry.batch * geometry.channels * units_per_row,
                }
            }
            Layout::ChannelsLast => {
                let rows_per_unit = UNIT_ELEMENTS.div_ceil(geometry.channels).max(MIN_UNIT_ROWS);
                Plan {
                    geometry,
                    units_per_row: 0,
                    rows_per_unit,
                    units: rows.div_ceil(rows_per_unit),
                }
            }
        }
    }

    fn unit(&self, u: usize) -> Unit {
        let g = &self.geometry;
        match g.layout {
            Layout::ChannelsFirst => {
                let (row, part) = (u / self.units_per_row, u % self.units_per_row);
                let offset = part * UNIT_ELEMENTS;
                Unit {
                    start: row * g.inner + offset,
                    len: (g.inner - offset).min(UNIT_ELEMENTS),
                    channel: row % g.channels,
                }
            }
            Layout::ChannelsLast => {
                let rows = g.batch * g.inner;
                let first = u * self.rows_per_unit;
                let count = (rows - first).min(self.rows_per_unit);
                Unit {
                    start: first * g.channels,
                    len: count * g.channels,
                    channel: 0,
                }
            }
        }
    }

    /// Number of per-channel partial slots each unit writes.
    fn partial_width(&self) -> usize {
        match self.geometry.layout {
            Layout::ChannelsFirst => 1,
            Layout::ChannelsLast => self.geometry.channels,
        }
    }

    /// Runs `work(unit_index, unit)` for every unit, on all cores when it pays.
    fn for_each_unit(&self, work: impl Fn(usize, Unit) + Sync) {
        let threads = if self.geometry.numel() < PARALLEL_THRESHOLD {
            1
        } else {
            worker_threads()
        };
        // Hand out runs of units totalling about UNIT_ELEMENTS, to keep tiny units cheap.
        let unit_len = (self.geometry.numel() / self.units).max(1);
        let batch = (UNIT_ELEMENTS / unit_len).max(1);
        let next = AtomicUsize::new(0);
        let worker = || loop {
            let first = next.fetch_add(batch, Ordering::Relaxed);
            if first >= self.units {
                break;
            }
            for u in first..(first + batch).min(self.units) {
                work(u, self.unit(u));
            }
        };
        if threads <= 1 {
            worker();
        } else {
            std::thread::scope(|s| {
                for _ in 1..threads {
                    s.spawn(worker);
                }
                worker();
            });
        }
    }

    /// Adds per-unit partials (`width` values each) into per-channel f64 sums, in unit order.
    fn combine(&self, partials: &[f64], sums: &mut [f64]) {
        let width = self.partial_width();
        for u in 0..self.units {
            let part = &partials[u * width..(u + 1) * width];
            match self.geometry.layout {
                Layout::ChannelsFirst => sums[self.unit(u).channel] += part[0],
                Layout::ChannelsLast => sums.iter_mut().zip(part).for_each(|(s, p)| *s += p),
            }
        }
    }
}

fn worker_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A raw pointer that units write through at disjoint ranges.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    /// SAFETY: the caller guarantees `start..start + len` is in bounds and that no other
    /// live slice overlaps it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

// ---------------------------------------------------------------------------------------
// The per-unit loop: walks a unit chunk by chunk, converting K inputs into stack buffers in
// the accumulation type, and hands each chunk to a body together with a mutable state.

/// One chunk of a unit.
struct Chunk<'a, A, const K: usize> {
    /// The chunk's elements of each input, converted.
    inputs: [&'a [A]; K],
    /// Index of the chunk's first element in the whole tensor.
    at: usize,
    /// Per-channel slots of the chunk's elements: `slot..slot + len` (see [`Slots`]).
    slot: usize,
}

impl<A, const K: usize> Chunk<'_, A, K> {
    fn len(&self) -> usize {
        self.inputs[0].len()
    }
}

/// Walks `unit` in chunks of at most CHUNK elements that never straddle a channels-last row.
/// `flush` runs every FLUSH_CHUNKS chunks and at the end.
fn walk_unit<E: Element, S, const K: usize>(
    geometry: &Geometry,
    inputs: [&[E]; K],
    unit: Unit,
    state: &mut S,
    mut body: impl FnMut(&mut S, Chunk<'_, E::Acc, K>),
    mut flush: impl FnMut(&mut S),
) {
    let mut buffers = [[E::Acc::default(); CHUNK]; K];
    let row_len = match geometry.layout {
        Layout::ChannelsFirst => unit.len,
        Layout::ChannelsLast => geometry.channels,
    };
    let mut offset = 0;
    let mut chunks = 0;
    while offset < unit.len {
        let in_row = offset % row_len;
        let len = (row_len - in_row).min(CHUNK);
        let at = unit.start + offset;
        for (buffer, input) in buffers.iter_mut().zip(inputs) {
            E::load(&input[at..at + len], &mut buffer[..len]);
        }
        let slot = match geometry.layout {
            Layout::ChannelsFirst => 0,
            Layout::ChannelsLast => in_row,
        };
        body(
            state,
            Chunk {
                inputs: std::array::from_fn(|k| &buffers[k][..len]),
                at,
                slot,
            },
        );
        offset += len;
        chunks += 1;
        if chunks % FLUSH_CHUNKS == 0 {
            flush(state);
        }
    }
    flush(state);
}

/// Per-slot values: channels-first units use CHUNK slots that all belong to the unit's
/// channel; channels-last units use one slot per channel.
fn slot_count(geometry: &Geometry) -> usize {
    match geometry.layout {
        Layout::ChannelsFirst => CHUNK,
        Layout::ChannelsLast => geometry.channels,
    }
}

/// Per-slot channel parameters for one unit: the unit's channel value repeated, or the
/// per-channel values themselves.
fn unit_params<A: Acc>(geometry: &Geometry, per_channel: &[A], unit: &Unit) -> Vec<A> {
    match geometry.layout {
        Layout::ChannelsFirst => vec![per_channel[unit.channel]; CHUNK],
        Layout::ChannelsLast => per_channel.to_vec(),
    }
}

/// K per-slot sums for one unit, accumulated in the working precision and flushed into f64.
struct SlotSums<A, const K: usize> {
    working: [Vec<A>; K],
    total: [Vec<f64>; K],
}

impl<A: Acc, const K: usize> SlotSums<A, K> {
    fn new(slots: usize) -> Self {
        SlotSums {
            working: std::array::from_fn(|_| vec![A::default(); slots]),
            total: std::array::from_fn(|_| vec![0.0; slots]),
        }
    }

    fn flush(&mut self) {
        for (total, working) in self.total.iter_mut().zip(self.working.iter_mut()) {
            for (t, w) in total.iter_mut().zip(working.iter_mut()) {
                *t += w.to_f64();
                *w = A::default();
            }
        }
    }

    /// Writes the unit's partials, K groups of `plan.partial_width()` values.
    fn write_partials(&self, layout: Layout, out: &mut [f64]) {
        let width = out.len() / K;
        for (k, total) in self.total.iter().enumerate() {
            let part = &mut out[k * width..(k + 1) * width];
            match layout {
                Layout::ChannelsFirst => part[0] = total.iter().sum(),
                Layout::ChannelsLast => part.copy_from_slice(total),
            }
        }
    }
}

/// Runs a reducing pass: `body` adds into the K slot sums of each unit; returns K per-channel
/// f64 sums combined in unit order.
fn reduce_pass<E: Element, const I: usize, const K: usize>(
    plan: &Plan,
    inputs: [&[E]; I],
    body: impl Fn(&mut SlotSums<E::Acc, K>, &Unit, Chunk<'_, E::Acc, I>) + Sync,
) -> [Vec<f64>; K] {
    let g = plan.geometry;
    let width = plan.partial_width();
    let mut partials = vec![0.0f64; plan.units * width * K];
    let out = SharedMut(partials.as_mut_ptr());
    plan.for_each_unit(|u, unit| {
        let mut sums = SlotSums::<E::Acc, K>::new(slot_count(&g));
        walk_unit(
            &g,
            inputs,
            unit,
            &mut sums,
            |s, chunk| body(s, &unit, chunk),
            SlotSums::flush,
        );
        // SAFETY: unit u owns partials[u * width * K..(u + 1) * width * K].
        sums.write_partials(g.layout, unsafe { out.slice(u * width * K, width * K) });
    });
    std::array::from_fn(|k| {
        let mut sums = vec![0.0f64; g.channels];
        let group: Vec<f64> = (0..plan.units)
            .flat_map(|u| {
                partials[(u * K + k) * width..(u * K + k + 1) * width]
                    .iter()
                    .copied()
            })
            .collect();
        plan.combine(&group, &mut sums);
        sums
    })
}

/// Per-channel `Q_c = sum (mean - target)^2`.
fn channel_sumsq<E: Element>(plan: &Plan, mean: &[E], target: &[E]) -> Vec<f64> {
    let [q] = reduce_pass::<E, 2, 1>(plan, [mean, target], |sums, _, chunk| {
        let [m, t] = chunk.inputs;
        let acc = &mut sums.working[0][chunk.slot..chunk.slot + chunk.len()];
        for ((a, &m), &t) in acc.iter_mut().zip(m).zip(t) {
            let d = m - t;
            *a = *a + d * d;
        }
    });
    q
}

/// Output tensors written element by element, at the positions of the inputs.
struct Outputs<E> {
    first: Option<SharedMut<E>>,
    /// Receives the negation of what `first` receives.
    negated: Option<SharedMut<E>>,
}

impl<E: Element> Outputs<E> {
    /// Stores `values` (and their negation) at element `at`.
    fn store(&self, values: &mut [E::Acc], at: usize) {
        let n = values.len();
        // SAFETY: units cover disjoint element ranges, and each output spans all elements.
        if let Some(first) = self.first {
            E::store(values, unsafe { first.slice(at, n) });
        }
        if let Some(negated) = self.negated {
            for v in values.iter_mut() {
                *v = E::Acc::default() - *v;
            }
            E::store(values, unsafe { negated.slice(at, n) });
        }
    }
}

/// `out = k_c * (mean - target)` and/or its negation, per element.
fn scaled_difference<E: Element>(
    plan: &Plan,
    mean: &[E],
    target: &[E],
    scale: &[f64],
    outputs: Outputs<E>,
) {
    let g = plan.geometry;
    let scale: Vec<E::Acc> = scale.iter().map(|&v| E::Acc::from_f64(v)).collect();
    plan.for_each_unit(|_, unit| {
        let params = unit_params(&g, &scale, &unit);
        let mut out = [E::Acc::default(); CHUNK];
        walk_unit(
            &g,
            [mean, target],
            unit,
            &mut (),
            |_, chunk| {
                let [m, t] = chunk.inputs;
                let n = chunk.len();
                let k = &params[chunk.slot..chunk.slot + n];
                for (((o, &m), &t), &k) in out.iter_mut().zip(m).zip(t).zip(k) {
                    *o = k * (m - t);
                }
                outputs.store(&mut out[..n], chunk.at);
            },
            |_| {},
        );
    });
}

/// Per-element loss `l = a_c * (mean - target)^2 + b_c`.
fn elementwise_loss<E: Element>(
    plan: &Plan,
    mean: &[E],
    target: &[E],
    a: &[f64],
    b: &[f64],
    out: &mut [E],
) {
    let g = plan.geometry;
    let a: Vec<E::Acc> = a.iter().map(|&v| E::Acc::from_f64(v)).collect();
    let b: Vec<E::Acc> = b.iter().map(|&v| E::Acc::from_f64(v)).collect();
    let outputs = Outputs {
        first: Some(SharedMut(out.as_mut_ptr())),
        negated: None,
    };
    plan.for_each_unit(|_, unit| {
        let (pa, pb) = (unit_params(&g, &a, &unit), unit_params(&g, &b, &unit));
        let mut buf = [E::Acc::default(); CHUNK];
        walk_unit(
            &g,
            [mean, target],
            unit,
            &mut (),
            |_, chunk| {
                let [m, t] = chunk.inputs;
                let n = chunk.len();
                let (pa, pb) = (
                    &pa[chunk.slot..chunk.slot + n],
                    &pb[chunk.slot..chunk.slot + n],
                );
                for ((((o, &m), &t), &a), &b) in buf.iter_mut().zip(m).zip(t).zip(pa).zip(pb) {
                    let d = m - t;
                    *o = a * d * d + b;
                }
                outputs.store(&mut buf[..n], chunk.at);
            },
            |_| {},
        );
    });
}

/// Backward of Reduction::None: writes `G * d / var_c` (and/or its negation) and returns the
/// per-channel sums `R1_c = sum G` and `R2_c = sum G * d^2` for the log_scale gradient.
fn none_backward<E: Element>(
    plan: &Plan,
    mean: &[E],
    target: &[E],
    grad: &[E],
    inv_var: &[f64],
    outputs: Outputs<E>,
) -> [Vec<f64>; 2] {
    let g = plan.geometry;
    let inv_var: Vec<E::Acc> = inv_var.iter().map(|&v| E::Acc::from_f64(v)).collect();
    let write = outputs.first.is_some() || outputs.negated.is_some();
    reduce_pass::<E, 3, 2>(plan, [mean, target, grad], |sums, unit, chunk| {
        let [m, t, gr] = chunk.inputs;
        let n = chunk.len();
        let range = chunk.slot..chunk.slot + n;
        let [r1, r2] = &mut sums.working;
        let (r1, r2) = (&mut r1[range.clone()], &mut r2[range.clone()]);
        for (((a1, a2), (&m, &t)), &gv) in r1
            .iter_mut()
            .zip(r2.iter_mut())
            .zip(m.iter().zip(t))
            .zip(gr)
        {
            let d = m - t;
            *a1 = *a1 + gv;
            *a2 = *a2 + gv * d * d;
        }
        if write {
            let per_channel = match g.layout {
                Layout::ChannelsFirst => None,
                Layout::ChannelsLast => Some(&inv_var[range]),
            };
            let mut out = [E::Acc::default(); CHUNK];
            for (j, o) in out[..n].iter_mut().enumerate() {
                let iv = per_channel.map_or(inv_var[unit.channel], |p| p[j]);
                *o = gr[j] * (m[j] - t[j]) * iv;
            }
            outputs.store(&mut out[..n], chunk.at);
        }
    })
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
    let alpha = Vec::<f64>::try_from(&problem.log_scale.to_kind(Kind::Double))?;
    Ok(ChannelParams::new(&alpha, problem.options.eps_value()))
}

/// Fused CPU forward.
pub(crate) fn forward(problem: &VidProblem) -> Result<ForwardOutput> {
    let plan = Plan::new(problem.geometry);
    let params = channel_params(problem)?;
    let opts = &problem.options;
    dispatch_dtype!(problem.kind(), E => {
        let (mean, target) = (elements::<E>(&problem.mean), elements::<E>(&problem.target));
        match opts.reduction_mode() {
            Reduction::None => {
                let a: Vec<f64> = params.var.iter().map(|v| 0.5 / v).collect();
                let b: Vec<f64> = params.ln_var.iter().map(|l| 0.5 * l + params.constant(opts)).collect();
                let mut loss = problem.mean.f_empty_like()?;
                elementwise_loss::<E>(&plan, mean, target, &a, &b, elements_mut(&mut loss));
                Ok(ForwardOutput { loss, channel_sumsq: None })
            }
            reduction => {
                let q = channel_sumsq::<E>(&plan, mean, target);
                let value = params.reduced_loss(&q, &problem.geometry, opts, reduction);
                let loss = Tensor::f_scalar_tensor(value, (problem.kind(), problem.device()))?;
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
            .then(|| problem.mean.f_empty_like().map_err(VidError::from))
            .transpose()
    };
    let (mut grad_mean, mut grad_target) = (new_output(needs.mean)?, new_output(needs.target)?);
    dispatch_dtype!(problem.kind(), E => {
        let (mean, target) = (elements::<E>(&problem.mean), elements::<E>(&problem.target));
        let outputs = Outputs::<E> {
            first: grad_mean.as_mut().map(|t| SharedMut(elements_mut::<E>(t).as_mut_ptr())),
            negated: grad_target.as_mut().map(|t| SharedMut(elements_mut::<E>(t).as_mut_ptr())),
        };
        match opts.reduction_mode() {
            Reduction::None => {
                let grad = problem.in_layout(&grad.to_kind(problem.kind()));
                let inv_var: Vec<f64> = params.var.iter().map(|v| 1.0 / v).collect();
                let [r1, r2] = none_backward::<E>(&plan, mean, target, elements::<E>(&grad), &inv_var, outputs);
                if needs.log_scale {
                    grads.log_scale = Some(Tensor::from_slice(&params.log_scale_grad_none(&r1, &r2)));
                }
            }
            reduction => {
                let q = channel_sumsq.ok_or_else(|| VidError::Autograd("missing saved sums".into()))?;
                let q = Vec::<f64>::try_from(q)?;
                let upstream = grad.to_kind(Kind::Double).f_double_value(&[])?;
                let k = upstream * params.reduction_factor(&problem.geometry, reduction);
                if grad_mean.is_some() || grad_target.is_some() {
                    let scale: Vec<f64> = params.var.iter().map(|v| k / v).collect();
                    scaled_difference::<E>(&plan, mean, target, &scale, outputs);
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
