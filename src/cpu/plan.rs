//! Work decomposition: a pass is cut into fixed units that depend only on the shape (never
//! on the thread count or on timing); each unit writes its partial sums to its own slots, and
//! slots are combined in index order, so results are bitwise identical on any thread count.
//! Units of one or several passes run in one parallel region on libtorch's thread pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::validate::{Geometry, Layout};

/// Target elements per unit of work.
pub(super) const UNIT_ELEMENTS: usize = 1 << 15;
/// Channels-last units hold at least this many rows, bounding their partials to numel / 64.
const MIN_UNIT_ROWS: usize = 64;
/// Channels-first: each partial sum covers at least this many elements of its channel
/// (several images' rows when rows are short), bounding the partials to numel / 64 (or C).
const MIN_SLOT_ELEMENTS: usize = 64;
/// Below this many elements (all passes of a region together), one thread does everything.
const PARALLEL_THRESHOLD: usize = 1 << 16;

// Work decomposition

/// A unit of work. Channels-first: channels `channels` of images `batches`, each `(n, c)` row
/// whole, or (`parts_per_row > 1`) elements `begin..end` of one row. Channels-last: rows
/// `rows` of C.
#[derive(Clone, Debug)]
pub(super) struct Unit {
    pub(super) index: usize,
    /// Channels-first only.
    pub(super) batch_block: usize,
    pub(super) batches: std::ops::Range<usize>,
    pub(super) channels: std::ops::Range<usize>,
    /// Channels-last only.
    pub(super) rows: std::ops::Range<usize>,
    pub(super) part: usize,
    pub(super) begin: usize,
    pub(super) end: usize,
}

/// The fixed decomposition of a problem into units, and where their partial sums go.
pub(super) struct Plan {
    pub(super) geometry: Geometry,
    /// Channels-first: parts per row (1 unless rows are longer than a unit).
    pub(super) parts_per_row: usize,
    /// Channels-first: images and channels per unit; short rows take several images so that
    /// a partial covers at least MIN_SLOT_ELEMENTS elements.
    pub(super) batch_per_unit: usize,
    pub(super) channels_per_unit: usize,
    /// Channels-last: rows (of C) per unit.
    pub(super) rows_per_unit: usize,
    pub(super) units: usize,
}

impl Plan {
    pub(super) fn new(geometry: Geometry) -> Plan {
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

    pub(super) fn unit(&self, index: usize) -> Unit {
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
    pub(super) fn slots(&self) -> usize {
        match self.geometry.layout {
            Layout::ChannelsFirst => {
                self.batch_blocks() * self.geometry.channels * self.parts_per_row
            }
            Layout::ChannelsLast => self.units * self.geometry.channels,
        }
    }

    /// Adds one plane of partials into per-channel f64 sums, in slot order.
    pub(super) fn combine(&self, plane: &[f64]) -> Vec<f64> {
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
}

thread_local! {
    /// Passes over the elements started on this thread (see [`passes_started`]).
    static PASSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many passes over the elements the CPU backend started on the calling thread (a
/// pass reads the problem's inputs once): what the tests count to see that a one-pass
/// step reads the data once.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) fn passes_started() -> usize {
    PASSES.with(|p| p.get())
}

/// Runs every unit of every pass in one parallel region, on all cores when it pays.
pub(super) fn run_units(passes: &[&dyn UnitWork]) {
    PASSES.with(|p| p.set(p.get() + passes.len()));
    let numel: usize = passes.iter().map(|p| p.plan().geometry.numel()).sum();
    let threads = if numel < PARALLEL_THRESHOLD {
        1
    } else {
        worker_threads()
    };
    // Hand out runs of units totalling about UNIT_ELEMENTS, to keep small units cheap: work
    // item i is units `first..end` of pass `pass`.
    let mut items: Vec<(usize, usize, usize)> = Vec::new();
    for (pass, work) in passes.iter().enumerate() {
        let plan = work.plan();
        let unit_len = (plan.geometry.numel() / plan.units.max(1)).max(1);
        let batch = (UNIT_ELEMENTS / unit_len).max(1);
        items.extend(
            (0..plan.units)
                .step_by(batch)
                .map(|first| (pass, first, (first + batch).min(plan.units))),
        );
    }
    let avx2 = has_avx2();
    let next = AtomicUsize::new(0);
    let worker = || {
        while let Some(&(pass, first, end)) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            for index in first..end {
                passes[pass].run_unit(index, avx2);
            }
        }
    };
    if threads <= 1 {
        worker();
    } else {
        // On libtorch's own pool: its OpenMP workers spin for a while after each of
        // libtorch's parallel ops, and threads of our own would compete with them.
        crate::autograd::parallel_for(threads.min(items.len()), &|_| worker());
    }
}

/// libtorch's intra-op thread count (`tch::set_num_threads` sets it).
pub(super) fn worker_threads() -> usize {
    tch::get_num_threads().max(1) as usize
}

pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The work of a pass on one unit.
pub(super) trait UnitWork: Sync {
    /// The decomposition of this pass.
    fn plan(&self) -> &Plan;
    /// Runs one unit (compiled for AVX2 when `avx2`: the caller checked the CPU has it).
    fn run_unit(&self, index: usize, avx2: bool);
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
