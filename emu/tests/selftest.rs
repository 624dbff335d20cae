//! Runs the kernels of selftest/selftest.cu through the emulator and checks them against
//! plain Rust on random data.
use std::ffi::c_void;

use vidfuse_emu::{kernel_names, launch, launch_seeded, DEFAULT_SEED};

const SELFTEST_CU: &str = include_str!("../selftest/selftest.cu");

/// xorshift64*: random data without a dependency; fixed seeds keep failures reproducible.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [lo, hi).
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn vec_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32(-1.0, 1.0)).collect()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Kernel arguments in `cuLaunchKernel` form: one 8-byte slot per argument value.
#[derive(Default)]
struct Args(Vec<u64>);

impl Args {
    fn arg<T: Copy>(mut self, value: T) -> Self {
        assert!(std::mem::size_of::<T>() <= 8 && std::mem::align_of::<T>() <= 8);
        let mut slot = 0u64;
        // SAFETY: T fits in the slot and needs no more than its alignment.
        unsafe { (&mut slot as *mut u64).cast::<T>().write(value) };
        self.0.push(slot);
        self
    }

    fn launch(
        self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
    ) -> Result<(), String> {
        self.launch_seeded(kernel, grid, block, smem, DEFAULT_SEED)
    }

    fn launch_seeded(
        mut self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        seed: u64,
    ) -> Result<(), String> {
        let mut params: Vec<*mut c_void> = self
            .0
            .iter_mut()
            .map(|slot| (slot as *mut u64).cast())
            .collect();
        launch_seeded(kernel, grid, block, smem, &mut params, seed)
    }
}

/// Seeds for the tests that sweep the emulation's random choices.
const SEEDS: std::ops::Range<u64> = 1..65;

fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

/// 1-based line of the first line of selftest.cu containing `needle`.
fn selftest_line(needle: &str) -> usize {
    SELFTEST_CU
        .lines()
        .position(|line| line.contains(needle))
        .expect(needle)
        + 1
}

/// Per-block sums of `grid` rows of `n` floats with `block` threads, checked against Rust.
fn check_block_sums(seed: u64, grid: u32, block: u32, n: u32) {
    check_block_sums_seeded(seed, grid, block, n, DEFAULT_SEED);
}

fn check_block_sums_seeded(seed: u64, grid: u32, block: u32, n: u32, emu_seed: u64) {
    let x = Rng(seed).vec_f32((grid * n) as usize);
    let mut out = vec![f32::NAN; grid as usize];
    Args::default()
        .arg(x.as_ptr())
        .arg(out.as_mut_ptr())
        .arg(n)
        .launch_seeded(
            "selftest_block_sum",
            [grid, 1, 1],
            [block, 1, 1],
            0,
            emu_seed,
        )
        .unwrap();
    for (b, row) in x.chunks(n as usize).enumerate() {
        let want: f64 = row.iter().map(|&v| f64::from(v)).sum();
        assert_close(
            f64::from(out[b]),
            want,
            1e-4,
            &format!("block {b} of {block} threads"),
        );
    }
}

#[test]
fn emu_grid_stride_copy() {
    let n = 1000u32; // more than grid * block: every thread strides
    let input = Rng(1).vec_f32(n as usize);
    let mut output = vec![f32::NAN; n as usize];
    Args::default()
        .arg(input.as_ptr())
        .arg(output.as_mut_ptr())
        .arg(n)
        .launch("selftest_copy", [3, 1, 1], [64, 1, 1], 0)
        .unwrap();
    assert_eq!(input, output);
}

#[test]
fn emu_block_reduce_partial_warp() {
    for (seed, block) in [(2, 96), (3, 100), (4, 7), (5, 33)] {
        check_block_sums(seed, 3, block, 777);
    }
}

#[test]
fn emu_multi_block_partials() {
    check_block_sums(6, 37, 256, 3000);
    check_block_sums(7, 5, 1024, 4099);
}

#[test]
fn emu_shfl_xor_butterfly() {
    let n = 128;
    let mut rng = Rng(8);
    let in_i: Vec<i32> = (0..n).map(|_| rng.below(2001) as i32 - 1000).collect();
    let in_d: Vec<f64> = (0..n).map(|_| f64::from(rng.f32(-1.0, 1.0))).collect();
    let in_f = rng.vec_f32(n);
    let mut sums = vec![0i64; 2 * n];
    let mut out_d = vec![f64::NAN; n];
    let mut out_max = vec![f32::NAN; n];
    Args::default()
        .arg(in_i.as_ptr())
        .arg(in_d.as_ptr())
        .arg(in_f.as_ptr())
        .arg(sums.as_mut_ptr())
        .arg(out_d.as_mut_ptr())
        .arg(out_max.as_mut_ptr())
        .launch("selftest_butterfly", [2, 1, 1], [64, 1, 1], 0)
        .unwrap();
    for t in 0..n {
        let warp = t / 32 * 32..t / 32 * 32 + 32;
        let sum_i: i64 = in_i[warp.clone()].iter().map(|&v| i64::from(v)).sum();
        assert_eq!(sums[2 * t], sum_i, "int sum, thread {t}");
        assert_eq!(sums[2 * t + 1], sum_i << 32, "long long sum, thread {t}");
        assert_close(
            out_d[t],
            in_d[warp.clone()].iter().sum(),
            1e-12,
            "double sum",
        );
        let max = in_f[warp].iter().copied().fold(f32::MIN, f32::max);
        assert_eq!(out_max[t], max, "float max, thread {t}");
    }
}

#[test]
fn emu_shfl_modes_votes_and_masks() {
    let mut rng = Rng(9);
    // Warp 0 has no zero (so __all_sync holds), warp 1 may.
    let input: Vec<u32> = (0..64)
        .map(|t| {
            if t < 32 {
                1 + rng.below(15) as u32
            } else {
                rng.below(16) as u32
            }
        })
        .collect();
    let mut out = vec![u32::MAX; 7 * 64];
    Args::default()
        .arg(input.as_ptr())
        .arg(out.as_mut_ptr())
        .launch("selftest_shfl_modes", [1, 1, 1], [64, 1, 1], 0)
        .unwrap();
    for t in 0..64 {
        let (lane, base) = (t % 32, t / 32 * 32);
        let warp = &input[base..base + 32];
        let ballot = (0..32)
            .filter(|&k| warp[k] & 1 != 0)
            .fold(0u32, |m, k| m | 1 << k);
        let all = u32::from(warp.iter().all(|&v| v != 0));
        let any = u32::from(warp.contains(&7));
        let want = [
            warp[5],
            warp[(lane & !7) + 3],
            if lane % 8 >= 2 {
                warp[lane - 2]
            } else {
                warp[lane]
            },
            if lane % 16 + 3 < 16 {
                warp[lane + 3]
            } else {
                warp[lane]
            },
            ballot,
            all | any << 1,
            if lane < 16 {
                warp[lane ^ 1]
            } else {
                warp[lane]
            },
        ];
        assert_eq!(out[7 * t..7 * t + 7], want, "thread {t}");
    }
}

fn shfl_missing_lane(input: &[f32], last_mask: u32) -> Result<Vec<f32>, String> {
    let mut out = vec![0.0f32; 40];
    Args::default()
        .arg(input.as_ptr())
        .arg(out.as_mut_ptr())
        .arg(last_mask)
        .launch("selftest_shfl_missing_lane", [1, 1, 1], [40, 1, 1], 0)
        .map(|()| out)
}

#[test]
fn emu_shfl_from_lane_outside_the_mask_is_poison() {
    let input = Rng(10).vec_f32(40);
    // The second warp has lanes 0..8 only, and names exactly those.
    let out = shfl_missing_lane(&input, 0xff).unwrap();
    for t in 0..32 {
        let want = if t + 8 < 32 { input[t + 8] } else { input[t] };
        assert_eq!(out[t], want, "full warp, lane {t}");
    }
    for (t, v) in out.iter().enumerate().skip(32) {
        assert_eq!(v.to_bits(), u32::MAX, "partial warp, thread {t}");
    }
}

#[test]
fn emu_mask_naming_a_missing_lane_is_an_error() {
    let err = shfl_missing_lane(&Rng(10).vec_f32(40), u32::MAX).unwrap_err();
    assert!(
        err.contains("names lane 8, which does not exist (the block has 40 threads)"),
        "{err}"
    );
}

#[test]
fn emu_dynamic_shared_memory() {
    let (grid, block) = (3usize, 48usize);
    let input = Rng(11).vec_f32(grid * block);
    let mut out = vec![f32::NAN; grid * block];
    let mut probe = vec![0u32; grid * block];
    Args::default()
        .arg(input.as_ptr())
        .arg(out.as_mut_ptr())
        .arg(probe.as_mut_ptr())
        .launch(
            "selftest_smem_reverse",
            [grid as u32, 1, 1],
            [block as u32, 1, 1],
            4 * block as u32,
        )
        .unwrap();
    for (b, (got, want)) in out.chunks(block).zip(input.chunks(block)).enumerate() {
        let reversed: Vec<f32> = want.iter().rev().copied().collect();
        assert_eq!(got, reversed, "block {b}");
    }
    // Every block, not only the first, starts from poisoned shared memory.
    assert!(probe.iter().all(|&word| word == u32::MAX), "{probe:x?}");
}

#[test]
fn emu_grid_3d_indices() {
    let (grid, block) = ([3u32, 2, 4], [4u32, 3, 2]);
    let per_block = block.iter().product::<u32>();
    let total = (grid.iter().product::<u32>() * per_block) as usize;
    let mut out = vec![u32::MAX; 2 * total];
    let mut dims = [0u32; 6];
    Args::default()
        .arg(out.as_mut_ptr())
        .arg(dims.as_mut_ptr())
        .launch("selftest_index_3d", grid, block, 0)
        .unwrap();
    assert_eq!(dims, [4, 3, 2, 3, 2, 4]);
    let mut g = 0;
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                for tz in 0..block[2] {
                    for ty in 0..block[1] {
                        for tx in 0..block[0] {
                            assert_eq!(out[2 * g], tx | ty << 8 | tz << 16, "thread of slot {g}");
                            assert_eq!(
                                out[2 * g + 1],
                                bx | by << 8 | bz << 16,
                                "block of slot {g}"
                            );
                            g += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(g, total);
}

#[test]
fn emu_float4_loads() {
    #[derive(Clone, Copy, Debug, PartialEq)]
    #[repr(C, align(16))]
    struct F4([f32; 4]);
    let n4 = 250usize;
    let mut rng = Rng(12);
    let x: Vec<F4> = (0..n4)
        .map(|_| F4([0; 4].map(|_: i32| rng.f32(-1.0, 1.0))))
        .collect();
    let y0: Vec<F4> = (0..n4)
        .map(|_| F4([0; 4].map(|_: i32| rng.f32(-1.0, 1.0))))
        .collect();
    let a = 1.75f32;
    let mut y = y0.clone();
    Args::default()
        .arg(x.as_ptr())
        .arg(y.as_mut_ptr())
        .arg(a)
        .arg(n4 as u32)
        .launch("selftest_axpy4", [4, 1, 1], [64, 1, 1], 0)
        .unwrap();
    for i in 0..n4 {
        let want = F4([0, 1, 2, 3].map(|k| a.mul_add(x[i].0[k], y0[i].0[k])));
        assert_eq!(y[i], want, "element {i}");
    }
}

/// Launches the deliberately broken barrier kernel, checks that the error names the block
/// and `expected`, then that the emulator still runs kernels on this thread.
fn check_bad_barrier(mode: i32, expected: &[String]) {
    let mut out = vec![0.0f32; 128];
    let err = Args::default()
        .arg(mode)
        .arg(out.as_mut_ptr())
        .launch("selftest_bad_barrier", [2, 1, 1], [64, 1, 1], 0)
        .expect_err("a deadlock must be reported");
    assert!(
        err.contains("selftest_bad_barrier") && err.contains(" block ("),
        "{err}"
    );
    for part in expected {
        assert!(err.contains(part.as_str()), "expected {part:?} in: {err}");
    }
    check_block_sums(13, 2, 64, 100);
}

#[test]
fn emu_deadlock_early_return_is_an_error() {
    let line = selftest_line("if (t == 5) return;") + 1;
    check_bad_barrier(
        0,
        &[
            format!("__syncthreads (selftest.cu:{line})"),
            "thread (5,0,0) has exited".into(),
        ],
    );
}

#[test]
fn emu_deadlock_divergent_syncthreads_is_an_error() {
    let line = selftest_line("if (t % 2 == 0) {") + 1;
    check_bad_barrier(
        1,
        &[
            format!("__syncthreads (selftest.cu:{line})"),
            format!("__syncthreads (selftest.cu:{})", line + 2),
        ],
    );
}

#[test]
fn emu_deadlock_warp_op_against_block_barrier_is_an_error() {
    let line = selftest_line("v = __shfl_xor_sync(0xffffffffu, v, 1);");
    check_bad_barrier(
        2,
        &[
            "__syncthreads (selftest.cu:".into(),
            format!("__shfl_xor_sync (selftest.cu:{line}, mask 0xffffffff)"),
        ],
    );
}

#[test]
fn emu_lane_outside_its_mask_is_an_error() {
    let line = selftest_line("v = __shfl_sync(0x1u, v, 0);");
    check_bad_barrier(
        3,
        &[
            format!("__shfl_sync (selftest.cu:{line}, mask 0x00000001) is called by lane "),
            ", outside its mask".into(),
        ],
    );
}

#[test]
fn emu_unknown_kernel_is_an_error() {
    let err = launch("no_such_kernel", [1, 1, 1], [1, 1, 1], 0, &mut []).unwrap_err();
    assert!(err.contains("unknown kernel 'no_such_kernel'"), "{err}");
}

#[test]
fn emu_invalid_launches_are_errors() {
    let input = [0.0f32; 4];
    let mut output = [0.0f32; 4];
    let output = output.as_mut_ptr();
    let copy = |grid, block| {
        Args::default()
            .arg(input.as_ptr())
            .arg(output)
            .arg(4u32)
            .launch("selftest_copy", grid, block, 0)
    };
    for (grid, block, needle) in [
        ([1, 1, 1], [0, 1, 1], "block dimension x = 0"),
        ([1, 1, 1], [1025, 1, 1], "block dimension x = 1025"),
        ([1, 1, 1], [32, 32, 2], "block of 2048 threads"),
        ([1, 0, 1], [32, 1, 1], "grid dimension y = 0"),
    ] {
        let err = copy(grid, block).unwrap_err();
        assert!(err.contains(needle), "{err}");
    }
    let err = Args::default()
        .arg(input.as_ptr())
        .launch("selftest_copy", [1, 1, 1], [4, 1, 1], 0)
        .unwrap_err();
    assert!(err.contains("takes 3 parameters, 1 given"), "{err}");
    copy([1, 1, 1], [4, 1, 1]).unwrap();
}

#[test]
fn emu_kernel_names_lists_selftests() {
    let names = kernel_names();
    for kernel in [
        "selftest_axpy4",
        "selftest_bad_barrier",
        "selftest_block_sum",
        "selftest_copy",
    ] {
        assert!(
            names.iter().any(|name| name == kernel),
            "{kernel} missing from {names:?}"
        );
    }
    assert!(names.windows(2).all(|pair| pair[0] < pair[1]), "{names:?}");
}

#[test]
fn emu_intrinsics_match_std() {
    let mut rng = Rng(14);
    let (a, b, c) = (rng.f32(-1.0, 1.0), rng.f32(0.5, 2.0), rng.f32(-1.0, 1.0));
    let (p, q) = (f64::from(rng.f32(0.1, 1.0)), f64::from(rng.f32(1.0, 3.0)));
    let (x, d) = ([a, b, c], [p, q]);
    let mut out = [f64::NAN; 31];
    let mut bits = [0i64; 14];
    Args::default()
        .arg(x.as_ptr())
        .arg(d.as_ptr())
        .arg(out.as_mut_ptr())
        .arg(bits.as_mut_ptr())
        .launch("selftest_intrinsics", [1, 1, 1], [1, 1, 1], 0)
        .unwrap();
    let floats = [
        a.exp(),
        b.ln(),
        a.ln_1p(),
        a.exp_m1(),
        b.sqrt(),
        1.0 / b.sqrt(),
        c.abs(),
        a.max(c),
        a.min(c),
        a.mul_add(b, c),
        a.exp(),
        b.ln(),
        a / b,
        1.0 / b,
        a.mul_add(b, c),
        a + b,
        a * b,
        a.min(c),
        a.max(c),
    ];
    let doubles = [
        p.exp(),
        q.ln(),
        p.ln_1p(),
        p.exp_m1(),
        q.sqrt(),
        1.0 / q.sqrt(),
        p,
        p.max(q),
        p.min(q),
        p.mul_add(q, p),
        p.min(q),
        p.max(q),
    ];
    for (k, want) in floats
        .iter()
        .map(|&v| f64::from(v))
        .chain(doubles)
        .enumerate()
    {
        let rel = if k < floats.len() { 1e-6 } else { 1e-14 };
        assert_close(out[k], want, rel, &format!("entry {k}"));
    }
    let ia = (c * 1000.0) as i32;
    let ub = (b * 1000.0) as u32;
    let lc = i64::from(ia) * 3_000_000_000;
    let ffs = |v: i32| {
        if v == 0 {
            0
        } else {
            v.trailing_zeros() as i64 + 1
        }
    };
    let want = [
        i64::from(a.to_bits() as i32),
        i64::from(c.to_bits()),
        1,
        2,
        p.to_bits() as i64,
        3,
        i64::from(ub.count_ones()),
        ffs(ia),
        i64::from((ia as u32).leading_zeros()),
        32,
        i64::from(ia.min(-7)),
        i64::from(ub.max(5)),
        lc.min(1),
        i64::from((ia as u32).max(3)),
    ];
    assert_eq!(bits, want);
}

#[test]
fn emu_concurrent_launches() {
    let workers: Vec<_> = (0..4u32)
        .map(|w| {
            std::thread::spawn(move || check_block_sums(20 + u64::from(w), 4, 32 * w + 50, 500))
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
}

// ---- what the emulation must catch; correct kernels under many seeds ---------------------

/// Launches a one-argument kernel plus an output of one float per thread.
fn launch_with_out<A: Copy>(
    kernel: &str,
    arg: A,
    grid: u32,
    threads: u32,
    seed: u64,
) -> Result<Vec<f32>, String> {
    let mut out = vec![f32::NAN; (grid * threads) as usize];
    Args::default()
        .arg(arg)
        .arg(out.as_mut_ptr())
        .launch_seeded(kernel, [grid, 1, 1], [threads, 1, 1], 0, seed)
        .map(|()| out)
}

fn at_line(marker: &str) -> String {
    format!("selftest.cu:{}", selftest_line(marker))
}

#[test]
fn emu_missing_barrier_is_a_race_naming_both_lines() {
    let (write, read) = (at_line("// neighbour write"), at_line("// neighbour read"));
    // Which access comes first depends on the interleaving; both orders are races.
    let (mut write_first, mut read_first) = (false, false);
    for seed in SEEDS {
        let err = launch_with_out("selftest_neighbour", 0i32, 2, 64, seed).unwrap_err();
        assert!(
            err.contains("shared-memory race in block (")
                && err.contains(&write)
                && err.contains(&read)
                && err.contains("with no barrier between them")
                && err.ends_with(&format!("(emulation seed {seed:#x})")),
            "{err}"
        );
        write_first |= err.contains(" wrote slots[") && err.contains(" reads it at ");
        read_first |= err.contains(" read slots[") && err.contains(" writes it at ");
    }
    assert!(
        write_first && read_first,
        "the seeds never changed the order"
    );
}

#[test]
fn emu_barrier_orders_every_seed() {
    for seed in SEEDS {
        let out = launch_with_out("selftest_neighbour", 1i32, 2, 48, seed).unwrap();
        let want: Vec<f32> = (0..2)
            .flat_map(|_| (0..48).map(|t| ((t + 1) % 48) as f32))
            .collect();
        assert_eq!(out, want, "seed {seed}");
    }
}

#[test]
fn emu_syncwarp_orders_its_warp_only() {
    for seed in SEEDS {
        let out = launch_with_out("selftest_warp_exchange", 1u32, 1, 64, seed).unwrap();
        let want: Vec<f32> = (0..64).map(|t| (t ^ 1) as f32).collect();
        assert_eq!(out, want, "seed {seed}");
    }
    let err = launch_with_out("selftest_warp_exchange", 32u32, 1, 64, DEFAULT_SEED).unwrap_err();
    let (write, read) = (at_line("// exchange write"), at_line("// exchange read"));
    assert!(
        err.contains("shared-memory race") && err.contains(&write) && err.contains(&read),
        "{err}"
    );
}

#[test]
fn emu_read_of_unwritten_shared_memory_is_an_error() {
    let mut out = vec![0.0f32; 32];
    let err = Args::default()
        .arg(out.as_mut_ptr())
        .launch("selftest_unwritten", [1, 1, 1], [32, 1, 1], 0)
        .unwrap_err();
    let read = at_line("// unwritten read");
    assert!(
        err.contains(" reads slots[")
            && err.contains(&format!(
                "] at {read}, which no thread of the block has written"
            )),
        "{err}"
    );
}

#[test]
fn emu_shared_index_out_of_bounds_is_an_error() {
    let write = at_line("// indexed write");
    let index = |i: i32| {
        Args::default()
            .arg(i)
            .launch("selftest_shared_index", [1, 1, 1], [32, 1, 1], 0)
    };
    index(63).unwrap();
    for i in [64, -1] {
        let err = index(i).unwrap_err();
        assert!(
            err.contains(&format!(
                "thread (0,0,0) of block (0,0,0) indexes slots[{i}] at {write}, outside its 64 elements"
            )),
            "{err}"
        );
    }
}

#[test]
fn emu_mask_naming_an_exited_lane_is_an_error() {
    let mut out = vec![0.0f32; 64];
    let err = Args::default()
        .arg(out.as_mut_ptr())
        .launch("selftest_mask_exited", [1, 1, 1], [64, 1, 1], 0)
        .unwrap_err();
    let line = selftest_line("// names an exited lane");
    assert!(
        err.contains(&format!(
            "__shfl_down_sync (selftest.cu:{line}, mask 0xffffffff) names lane 31 (thread (31,0,0)), which has exited"
        )),
        "{err}"
    );
}

/// The order in which a launch of `grid` ran its blocks, as linear block indices.
fn block_order(grid: [u32; 3], seed: u64) -> Vec<u32> {
    let blocks = grid.iter().product::<u32>() as usize;
    let mut counter = 0u32;
    let mut order = vec![u32::MAX; blocks];
    Args::default()
        .arg(&mut counter as *mut u32)
        .arg(order.as_mut_ptr())
        .launch_seeded("selftest_block_order", grid, [32, 1, 1], 0, seed)
        .unwrap();
    assert_eq!(counter as usize, blocks);
    order
}

#[test]
fn emu_blocks_run_in_a_seeded_random_order() {
    let grid = [5, 3, 2];
    let identity: Vec<u32> = (0..30).collect();
    let mut orders = std::collections::HashSet::new();
    for seed in SEEDS {
        let order = block_order(grid, seed);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, identity, "seed {seed}: not a permutation");
        assert_ne!(order, identity, "seed {seed}: index order");
        assert_eq!(
            order,
            block_order(grid, seed),
            "seed {seed} does not replay"
        );
        orders.insert(order);
    }
    assert!(orders.len() > SEEDS.count() / 2, "{} orders", orders.len());
    assert_eq!(block_order([2, 1, 1], 7), [1, 0]);
}

#[test]
fn emu_block_depending_on_a_lower_block_is_caught() {
    let in_order: Vec<u32> = (1..=8).collect();
    for seed in SEEDS {
        let mut chain = vec![0u32; 8];
        Args::default()
            .arg(chain.as_mut_ptr())
            .launch_seeded("selftest_block_chain", [8, 1, 1], [32, 1, 1], 0, seed)
            .unwrap();
        assert_ne!(chain, in_order, "seed {seed} ran the blocks in index order");
    }
}

/// The order in which the 64 threads of one block reached two atomics, twice each.
fn interleaving(seed: u64) -> Vec<u32> {
    let mut counter = 0u32;
    let mut log = vec![u32::MAX; 128];
    Args::default()
        .arg(&mut counter as *mut u32)
        .arg(log.as_mut_ptr())
        .launch_seeded("selftest_interleave", [1, 1, 1], [64, 1, 1], 0, seed)
        .unwrap();
    log
}

#[test]
fn emu_threads_interleave_between_barriers_not_in_lock_step() {
    let (mut split, mut lanes_reordered) = (false, false);
    for seed in SEEDS {
        let log = interleaving(seed);
        assert_eq!(log, interleaving(seed), "seed {seed} does not replay");
        // Another thread ran between a thread's two atomics.
        split |= log.chunks(2).any(|pair| pair[0] != pair[1]);
        // Some lane of warp 0 went before a lower lane.
        let warp0: Vec<u32> = log.iter().copied().filter(|&t| t < 32).collect();
        lanes_reordered |= warp0.windows(2).any(|w| w[1] < w[0]);
    }
    assert!(
        split && lanes_reordered,
        "split {split}, lanes reordered {lanes_reordered}"
    );
}

#[test]
fn emu_correct_kernels_pass_under_many_seeds() {
    for seed in SEEDS {
        check_block_sums_seeded(30, 3, 100, 777, seed);
        check_block_sums_seeded(31, 2, 256, 1000, seed);
        check_block_sums_seeded(32, 2, 33, 50, seed);
    }
}
