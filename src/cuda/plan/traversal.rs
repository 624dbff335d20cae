//! How a traversal walks one problem (the warp or the tile traversal, its fixed chunks and
//! their partial-sum slots), and the grid a launch of them gets on a GPU. Every choice
//! follows from the shape, the dtype and the inputs' alignment alone, so the partial sums,
//! and the result's bits, are the same on every GPU model.

use super::abi::TraverseArgs;
use crate::error::{Result, VidError};
use crate::validate::{Geometry, Layout};

/// Threads per block of every kernel (kernels/vid.cu: kBlock and __launch_bounds__).
pub(crate) const BLOCK: u32 = 256;
/// Warps per block in the warp traversal.
const WARPS_PER_BLOCK: u64 = BLOCK as u64 / 32;
/// NCHW rows at least this long use the warp traversal; shorter ones the tile traversal.
const WARP_MIN_ROW: usize = 512;
/// Elements per warp segment (a multiple of every pack width).
const WARP_SEGMENT: usize = 4096;
/// 16-byte packs of each input a thread walks per tile chunk (a virtual block): 32 KiB of each
/// input per chunk in every dtype, so that the chunk's fixed costs (finding its segment and
/// channels, the partials' reduction tree) are spread over as many bytes whatever the element
/// size. 32 MiB of each input make 1024 chunks, two waves of two blocks per SM on a 170-SM
/// GPU.
pub(crate) const TILE_PACKS_PER_THREAD: usize = 8;
/// Rows of a tile chunk for 4-byte elements: each partial sum covers at least this many rows
/// of its column, so an f32 partial is written and read once per 64 elements of each input
/// (1.6% of the op's bytes).
const CHUNK_ROWS_F32: usize = 64;
/// Resident blocks per SM of the traversal kernels (kernels/vid.cu: __launch_bounds__(256, 2)).
pub(crate) const BLOCKS_PER_SM: usize = 2;
/// Waves of resident blocks a traversal grid covers at most (and at least 2 when it loops).
const MAX_WAVES: usize = 4;
/// Partials (per lane of a warp, for one channel) one block of the combine walks at most in
/// a run of chunks: past this, the combine splits the chunks into runs summed in parallel.
const COMBINE_RUN_LOADS: usize = 32;
/// The largest grid.y.
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// Blocks of a traversal launch over `blocks` virtual blocks: all of them up to MAX_WAVES
/// waves of resident blocks, else 2 to MAX_WAVES waves, each block looping over an equal
/// share (within one). Sizes the grid only: what each virtual block writes is fixed.
pub(crate) fn traversal_grid(blocks: usize, multiprocessors: Option<u32>) -> usize {
    let Some(sms) = multiprocessors.filter(|&n| n > 0) else {
        return blocks;
    };
    let most = MAX_WAVES * BLOCKS_PER_SM * sms as usize;
    if blocks <= most {
        return blocks;
    }
    // ceil(blocks / per_block) <= most, and > most / 2 since blocks > most.
    blocks.div_ceil(blocks.div_ceil(most))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// How a traversal walks the problem, and where its partial sums go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Traversal {
    /// The tile traversal (else the warp traversal).
    pub(crate) tile: bool,
    /// Virtual blocks (fixed chunks) of the problem's own grid; tile: `grid_x` row chunks
    /// times the column tiles.
    pub(crate) blocks: usize,
    pub(super) grid_x: usize,
    pub(super) rows: usize,
    pub(super) row_len: usize,
    pub(super) seg_len: usize,
    pub(super) channel_div: usize,
    pub(super) tile_x: usize,
    pub(super) vectorized: bool,
    /// Elements from the 16-byte boundary below every tensor's base to the base.
    pub(super) phase: usize,
    /// Tile: elements and columns of the `[rows][cols]` view (`rows` and `row_len` above
    /// describe its super-rows).
    pub(super) elements: usize,
    pub(super) cols: usize,
    /// Partial slots per (outer, channel): partial[((o * C + c) * inner + j) * K + k].
    pub(crate) outer: usize,
    pub(crate) inner: usize,
}

impl Traversal {
    /// `phase`: where every tensor's base lies past a 16-byte boundary, in elements, when all
    /// agree (packs then start at the same elements of each), else `None` (no packs).
    pub(crate) fn plan(
        geometry: &Geometry,
        pack: usize,
        phase: Option<usize>,
    ) -> Result<Traversal> {
        let (n, c, s) = (geometry.batch, geometry.channels, geometry.inner);
        match geometry.layout {
            Layout::ChannelsFirst if s >= WARP_MIN_ROW => {
                // Rows that start or end between pack boundaries are walked in packs too,
                // with scalar heads and tails (kernels/vid.cu: warp_traverse).
                let segments = s.div_ceil(WARP_SEGMENT);
                let items = (n * c * segments) as u64;
                let blocks = items.div_ceil(WARPS_PER_BLOCK) as usize;
                Ok(Traversal {
                    tile: false,
                    blocks,
                    grid_x: blocks,
                    rows: n * c,
                    row_len: s,
                    seg_len: WARP_SEGMENT,
                    channel_div: 1,
                    tile_x: 0,
                    vectorized: phase.is_some(),
                    phase: phase.unwrap_or(0),
                    elements: 0,
                    cols: 0,
                    outer: n,
                    inner: segments,
                })
            }
            // Short NCHW rows: the [N][C * S] view, channel = column / S.
            Layout::ChannelsFirst => Self::tile(n, c * s, s, pack, phase),
            Layout::ChannelsLast => Self::tile(n * s, c, 1, pack, phase),
        }
    }

    /// The tile traversal of a `[rows][cols]` view, walked as super-rows of the k rows
    /// that make a multiple of the pack (kernels/vid.cu: tile_traverse). Every choice follows
    /// from the shape, dtype and `phase` alone (never from the GPU), so the partial sums, and
    /// the result's bits, are the same on every GPU model.
    pub(super) fn tile(
        rows: usize,
        cols: usize,
        channel_div: usize,
        pack: usize,
        phase: Option<usize>,
    ) -> Result<Traversal> {
        // The kernel adds a column and a row's width in 32 bits: widths below 2^31.
        let fits = |width: usize| width < 1 << 31;
        if !fits(cols) {
            return Err(VidError::invalid(
                "mean",
                format!("{cols} columns exceed the kernels' 31-bit column index"),
            ));
        }
        let super_row = pack / gcd(cols, pack) * cols;
        let (width, phase) = match phase {
            Some(phase) if fits(super_row) => (pack, phase),
            _ => (1, 0),
        };
        let row_len = if width == 1 { cols } else { super_row };
        let elements = rows * cols;
        let super_rows = (elements + phase).div_ceil(row_len);
        let pack_cols = row_len / width;
        // 16-byte packs hold `pack` elements: 16-bit inputs take twice the rows per chunk,
        // so partials stay the same fraction of the bytes.
        let chunk_rows = CHUNK_ROWS_F32 * (pack / 4).max(1);
        let chunk_elements = BLOCK as usize * TILE_PACKS_PER_THREAD * pack;
        // Threads across the columns: about chunk_elements per block over chunk_rows rows.
        let wanted = (chunk_elements / (chunk_rows * width))
            .clamp(1, BLOCK as usize)
            .next_power_of_two();
        let tile_x = pack_cols.min(wanted);
        let tile_y = BLOCK as usize / tile_x;
        // Narrow views (a few packs per super-row) take more rows per chunk, so that a block
        // still covers about chunk_elements.
        let rows_wanted = chunk_rows.max(chunk_elements / row_len).max(tile_y);
        let seg_len = rows_wanted.div_ceil(tile_y) * tile_y;
        let chunks = super_rows.div_ceil(seg_len);
        let col_tiles = pack_cols.div_ceil(tile_x);
        Ok(Traversal {
            tile: true,
            blocks: chunks * col_tiles,
            grid_x: chunks,
            rows: super_rows,
            row_len,
            seg_len,
            channel_div,
            tile_x,
            vectorized: width > 1,
            phase,
            elements,
            cols,
            outer: chunks,
            // Each chunk has a partial per column of a super-row: k per column of the view.
            inner: row_len / cols * channel_div,
        })
    }

    /// How the combine walks the partials: `(groups, chunks per group)`, `(1, outer)` in one
    /// launch. The combine's warps split a run's chunks 8 ways (kernels/vid.cu:
    /// channel_sums_across/_within), and each lane reads `ceil(inner / 32)` partials per
    /// chunk when a chunk has several per channel: runs keep that at most
    /// COMBINE_RUN_LOADS per lane. From the shape alone, as the partials are.
    pub(crate) fn combine_runs(&self) -> (usize, usize) {
        let per_chunk = if self.inner == 1 {
            1
        } else {
            self.inner.div_ceil(32)
        };
        let run = (COMBINE_RUN_LOADS * WARPS_PER_BLOCK as usize / per_chunk).max(1);
        let groups = self.outer.div_ceil(run).max(1);
        (groups, self.outer.div_ceil(groups))
    }

    /// Slots of the split combine's run sums per sum (0 in one launch).
    pub(crate) fn run_slots(&self, channels: usize) -> usize {
        match self.combine_runs() {
            (1, _) => 0,
            (groups, _) => groups * channels,
        }
    }

    /// 16-byte packs of each input a thread walks per chunk (for the tile traversal, rows of
    /// its column tile; a warp segment is 32 lanes wide).
    #[cfg(test)]
    pub(crate) fn packs_per_thread(&self, pack: usize) -> usize {
        if self.tile {
            self.seg_len / (BLOCK as usize / self.tile_x)
        } else {
            self.seg_len / (32 * pack)
        }
    }

    /// Partial slots per sum.
    pub(crate) fn slots(&self, channels: usize) -> usize {
        self.outer * channels * self.inner
    }

    pub(super) fn args(&self, geometry: &Geometry) -> TraverseArgs {
        TraverseArgs {
            rows: self.rows as i64,
            row_len: self.row_len as i64,
            seg_len: self.seg_len as i64,
            channels: geometry.channels as i64,
            channel_div: self.channel_div as i64,
            tile_x: self.tile_x as i64,
            vectorized: self.vectorized as i64,
            phase: self.phase as i64,
            elements: self.elements as i64,
            cols: self.cols as i64,
            ..TraverseArgs::default()
        }
    }
}
