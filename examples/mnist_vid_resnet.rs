//! Knowledge transfer with little data in a setting closer to the paper's Table 2 (Ahn et
//! al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019): residual
//! students, translation augmentation, three transfer points, on real MNIST digits, on two
//! CPU cores.
//!
//! A pre-activation ResNet teacher (stages of 32/64/128 channels) is trained on the
//! 3,500-image training pool of `data/mnist_5k.csv.gz`; students (8/16/32 channels) learn
//! from M = 2, 7 and 35 images per class, each translated by up to 2 pixels at random, for
//! the same number of steps at every M, with the paper's methods on the three stage outputs:
//! Student, KD, FitNet, AT, NST, VID-I, KD + AT, KD + VID-I. VID-I's initial variance and
//! its learning rate are chosen on the validation digits; VID-I at the reference
//! implementations' setting (initial variance 5, the network's learning rate) is reported
//! too, with a ceiling (the teacher's frozen trunk and a new head on the same images) and a
//! linear probe of how much of each teacher stage the student's stage explains.
//!
//! ```text
//! cargo run --release --features experiment --example mnist_vid_resnet -- --quick   # under a minute on 2 cores
//! cargo run --release --features experiment --example mnist_vid_resnet              # the full run, results/
//! ```

#[path = "mnist_vid/chart.rs"]
mod chart;
#[path = "mnist_vid/cli.rs"]
mod cli;
#[path = "mnist_vid/data.rs"]
mod data;
#[path = "mnist_vid_resnet/net.rs"]
mod net;
#[path = "mnist_vid/pool.rs"]
mod pool;
#[path = "mnist_vid_resnet/report.rs"]
mod report;
#[path = "mnist_vid/stats.rs"]
mod stats;
#[path = "mnist_vid_resnet/train.rs"]
mod train;
#[path = "mnist_vid/transfer.rs"]
mod transfer;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use tch::{nn, Tensor};

use data::{Dataset, Rng, POOL_PER_CLASS};
use net::{ResNet, TEACHER_WIDTHS};
use report::{Column, Phase, RunRecord};
use train::{CellData, EvalData, Schedule, VidSetting, Weights};
use transfer::Method;

/// Knowledge transfer with little data (Ahn et al. 2019, Table 2) with residual networks
/// and translation augmentation, on real MNIST digits.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A short demonstration: M = 7, one seed, short training, no selection on the
    /// validation digits (VID-I takes --vid-init-variance and --variance-lr, or 0.1 and the
    /// network's rate). Writes to target/mnist_vid_resnet_quick unless --out is given.
    #[arg(long)]
    quick: bool,

    #[command(flatten)]
    common: cli::Common,

    /// Seeds per cell; seed s draws the same training subset and the same initial student
    /// for every method, so methods are compared in pairs [default: 5; 1 with --quick].
    #[arg(long)]
    seeds: Option<u64>,

    /// Training images per class, comma-separated (at most 350) [default: 2,7,35; 7 with
    /// --quick].
    #[arg(long, value_delimiter = ',')]
    samples: Option<Vec<i64>>,

    /// Methods, comma-separated: student, kd, fitnet, at, nst, vid, kd+at, kd+vid
    /// [default: all; student,fitnet,vid with --quick].
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,

    /// Optimiser steps of every student run, whatever M [default: 400; 120 with --quick].
    #[arg(long)]
    steps: Option<usize>,

    /// Teacher training epochs over the 3,500-image pool [default: 10; 3 with --quick].
    #[arg(long)]
    teacher_epochs: Option<usize>,

    /// Batch size (of translated images).
    #[arg(long, default_value_t = 64)]
    batch: i64,

    /// Candidate initial variances of VID-I, chosen with --variance-lr-candidates on the
    /// validation digits (one setting for every M).
    #[arg(long, value_delimiter = ',', default_value = "5,1,0.1")]
    init_variance_candidates: Vec<f64>,

    /// Candidate learning rates of the VID variance (its own optimizer group).
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.5")]
    variance_lr_candidates: Vec<f64>,

    /// The M values of that choice, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,7")]
    selection_samples: Vec<i64>,

    /// Seeds per candidate and M in that choice (their subsets differ from the test seeds').
    #[arg(long, default_value_t = 1)]
    selection_seeds: u64,

    /// Skip the choice: this initial variance for VID-I (with --variance-lr).
    #[arg(long)]
    vid_init_variance: Option<f64>,

    /// Skip the choice: this learning rate for the VID variance (with --vid-init-variance).
    #[arg(long)]
    variance_lr: Option<f64>,
}

/// The reference implementations' VID-I variance: it starts at 5 and learns at the
/// network's rate (`variance_lr` is filled in from the schedule).
const REFERENCE_INIT_VARIANCE: f64 = 5.0;

/// One run of the grid.
#[derive(Clone, Copy)]
struct Job {
    phase: Phase,
    column: Column,
    vid: VidSetting,
    m: i64,
    seed: u64,
}

/// Each cell's (M, seed) translated training set with the teacher's outputs, built by the
/// first run that needs it and dropped after its last run: at M = 35 a cell holds 1.5 GB.
struct Cells<'a> {
    source: &'a Mutex<Source>,
    slots: HashMap<(i64, u64), Mutex<Slot>>,
}

/// What cells are built from: the teacher and the training pool (images, labels).
struct Source {
    teacher: ResNet,
    pool: (Tensor, Tensor),
}

struct Slot {
    /// The cell's images: indices into the training pool.
    subset: Vec<i64>,
    data: Option<CellData>,
    runs_left: usize,
}

impl Cells<'_> {
    fn checkout(&self, m: i64, seed: u64) -> anyhow::Result<CellData> {
        let mut slot = self.slots[&(m, seed)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.data.is_none() {
            let source = self.source.lock().unwrap_or_else(|e| e.into_inner());
            let (pool_x, pool_y) = &source.pool;
            let idx = Tensor::from_slice(&slot.subset).to_device(pool_x.device());
            slot.data = Some(CellData::new(
                &source.teacher,
                &pool_x.index_select(0, &idx),
                &pool_y.index_select(0, &idx),
            ));
        }
        slot.data.as_ref().map(CellData::share).context("cell data")
    }

    fn release(&self, m: i64, seed: u64) {
        let mut slot = self.slots[&(m, seed)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slot.runs_left = slot.runs_left.saturating_sub(1);
        if slot.runs_left == 0 {
            slot.data = None;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let quick = args.quick;
    let device = args.common.device()?;
    let seeds = args.seeds.unwrap_or(if quick { 1 } else { 5 });
    let samples = args
        .samples
        .clone()
        .unwrap_or(if quick { vec![7] } else { vec![2, 7, 35] });
    let methods: Vec<Method> = match &args.methods {
        Some(list) => cli::parse_list(list)?,
        None if quick => vec![Method::Student, Method::FitNet, Method::Vid],
        None => Method::ALL.to_vec(),
    };
    let sched = Schedule {
        lr: args.common.lr,
        momentum: args.common.momentum,
        weight_decay: args.common.weight_decay,
        batch: args.batch,
        steps: args.steps.unwrap_or(if quick { 120 } else { 400 }),
    };
    let teacher_epochs = args.teacher_epochs.unwrap_or(if quick { 3 } else { 10 });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = args.common.jobs(device);
    let weights = Weights {
        temperature: args.common.temperature,
        fitnet: args.common.fitnet_weight,
        at: args.common.at_weight,
        nst: args.common.nst_weight,
        vid_lambda: args.common.vid_lambda,
    };
    let reference = VidSetting {
        init_variance: REFERENCE_INIT_VARIANCE,
        variance_lr: sched.lr,
    };
    let fixed = match (args.vid_init_variance, args.variance_lr) {
        (None, None) if quick => Some(VidSetting {
            init_variance: 0.1,
            variance_lr: sched.lr,
        }),
        (None, None) => None,
        (v, lr) => Some(VidSetting {
            init_variance: v.unwrap_or(REFERENCE_INIT_VARIANCE),
            variance_lr: lr.unwrap_or(sched.lr),
        }),
    };
    let candidates: Vec<VidSetting> = args
        .init_variance_candidates
        .iter()
        .flat_map(|&v| {
            args.variance_lr_candidates
                .iter()
                .map(move |&lr| VidSetting {
                    init_variance: v,
                    variance_lr: lr,
                })
        })
        .collect();
    let out = args.common.out_dir("mnist_vid_resnet", quick);
    let max_m = POOL_PER_CLASS as i64;
    let in_pool = |ms: &[i64]| !ms.is_empty() && ms.iter().all(|m| (1..=max_m).contains(m));
    if !in_pool(&samples) || !in_pool(&args.selection_samples) {
        bail!("--samples and --selection-samples must list values in 1..={max_m} per class");
    }
    if sched.batch < 1 || sched.steps < 1 || jobs < 1 || seeds < 1 {
        bail!("--batch, --steps, --jobs and --seeds must be at least 1");
    }
    let positive = |x: &f64| x.is_finite() && *x > 0.0;
    let settings = candidates.iter().chain(&fixed);
    if !settings
        .clone()
        .all(|s| positive(&s.init_variance) && positive(&s.variance_lr))
    {
        bail!("initial variances and variance learning rates must be finite and > 0");
    }
    if fixed.is_none() && candidates.is_empty() {
        bail!("no VID-I candidate to choose from: give --init-variance-candidates and --variance-lr-candidates");
    }

    let ds = Dataset::load(&args.common.data)?;
    eprintln!(
        "data: {} images ({} training pool, {} validation, {} test) from {}; device {device:?}, \
         {jobs} run(s) at once",
        ds.len(),
        ds.train_pool_len(),
        ds.validation_len(),
        ds.test_len(),
        args.common.data.display()
    );

    // ---- teacher (on every core), then its outputs on the evaluation digits -------------
    tch::set_num_threads(cores as i32);
    tch::manual_seed(0);
    let t_vs = nn::VarStore::new(device);
    let teacher = ResNet::new(&(t_vs.root() / "teacher"), TEACHER_WIDTHS);
    let to_dev = |(x, y): (Tensor, Tensor)| (x.to_device(device), y.to_device(device));
    let (pool_x, pool_y) = to_dev(ds.train_pool());
    let t_started = Instant::now();
    let per_epoch = (pool_x.size()[0] + sched.batch - 1) / sched.batch;
    let t_sched = Schedule {
        steps: teacher_epochs * per_epoch as usize,
        ..sched
    };
    let pb = pool::bar(t_sched.steps as u64, "teacher");
    train::train_teacher(&teacher, &t_vs, &t_sched, &pool_x, &pool_y, || pb.inc(1))?;
    pb.finish_and_clear();
    let (val_x, val_y) = to_dev(ds.validation());
    let (test_x, test_y) = to_dev(ds.test());
    let val = EvalData::new(&teacher, val_x, val_y);
    let test = EvalData::new(&teacher, test_x, test_y);
    let teacher_accuracy = transfer::accuracy(&test.teacher.logits, &test.y);
    let teacher_seconds = t_started.elapsed().as_secs_f64();
    eprintln!(
        "teacher: test accuracy {:.2}% after {teacher_epochs} epochs ({teacher_seconds:.1} s)",
        100.0 * teacher_accuracy
    );
    tch::set_num_threads(1);

    let runner = Runner {
        source: Mutex::new(Source {
            teacher,
            pool: (pool_x, pool_y),
        }),
        eval: Mutex::new((test, val)),
        sched: &sched,
        weights: &weights,
        jobs,
    };

    // ---- VID-I's variance, chosen on the validation digits ------------------------------
    let any_vid = methods.iter().any(|m| m.uses_vid());
    let mut selection = Vec::new();
    if fixed.is_none() && any_vid {
        for &m in &args.selection_samples {
            for s in 0..args.selection_seeds {
                for &vid in &candidates {
                    selection.push(Job {
                        phase: Phase::Selection,
                        column: Column::Method(Method::Vid),
                        vid,
                        m,
                        seed: 100 + s,
                    });
                }
            }
        }
    }
    let mut records = runner.run(&ds, &selection, "choice")?;
    let chosen = fixed
        .or_else(|| report::chosen_setting(&records))
        .unwrap_or(reference);

    // ---- the table ---------------------------------------------------------------------
    let mut columns = vec![Column::Ceiling];
    for &method in &methods {
        columns.push(Column::Method(method));
        // The reference setting as a column of its own, unless it is the chosen one.
        if method == Method::Vid && chosen != reference {
            columns.push(Column::VidReference);
        }
    }
    let mut grid = Vec::new();
    for &m in &samples {
        for seed in 0..seeds {
            for &column in &columns {
                let vid = if column == Column::VidReference {
                    reference
                } else {
                    chosen
                };
                grid.push(Job {
                    phase: Phase::Main,
                    column,
                    vid,
                    m,
                    seed,
                });
            }
        }
    }
    records.extend(runner.run(&ds, &grid, "students")?);

    // ---- outputs -----------------------------------------------------------------------
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let info = report::RunInfo {
        teacher_accuracy,
        teacher_epochs,
        teacher_seconds,
        seeds,
        samples: samples.clone(),
        columns: columns.clone(),
        quick,
        device: format!("{device:?}"),
        jobs,
        sched,
        weights,
        selection_samples: args.selection_samples.clone(),
        selection_seeds: args.selection_seeds,
        fixed,
        chosen,
        reference,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::write_csvs(&out, &records)?;
    let text = report::markdown(&records, &info);
    std::fs::write(out.join("mnist_vid_resnet.md"), &text)?;
    report::plot(&out.join("mnist_vid_resnet.png"), &records, &info)?;
    println!("{text}");
    eprintln!(
        "wrote {}/mnist_vid_resnet*.{{csv,md,png}} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What every run needs, and the worker threads that train them.
struct Runner<'a> {
    source: Mutex<Source>,
    /// The test and validation digits with the teacher's outputs.
    eval: Mutex<(EvalData, EvalData)>,
    sched: &'a Schedule,
    weights: &'a Weights,
    jobs: usize,
}

impl Runner<'_> {
    /// Trains `grid`, cell by cell (largest M first, so the largest caches are built while
    /// every worker is busy), and returns its records in `grid` order.
    fn run(
        &self,
        ds: &Dataset,
        grid: &[Job],
        label: &'static str,
    ) -> anyhow::Result<Vec<RunRecord>> {
        let mut slots: HashMap<(i64, u64), Mutex<Slot>> = HashMap::new();
        for job in grid {
            let slot = slots.entry((job.m, job.seed)).or_insert_with(|| {
                Mutex::new(Slot {
                    subset: ds.subset(job.m, &mut Rng::new(1000 + job.seed)),
                    data: None,
                    runs_left: 0,
                })
            });
            slot.get_mut().unwrap_or_else(|e| e.into_inner()).runs_left += 1;
        }
        let cells = Cells {
            source: &self.source,
            slots,
        };
        let mut order: Vec<usize> = (0..grid.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(grid[i].m), grid[i].seed));
        let outcomes = pool::run_jobs(
            grid,
            order,
            self.jobs,
            label,
            || {
                let eval = self.eval.lock().unwrap_or_else(|e| e.into_inner());
                (eval.0.share(), eval.1.share())
            },
            |(test, val), job| {
                let (eval, probe) = match job.phase {
                    Phase::Selection => (val, None),
                    Phase::Main => (test, Some(val)),
                };
                let cell = cells.checkout(job.m, job.seed)?;
                let outcome = match job.column.method() {
                    None => train::train_ceiling(self.sched, &cell, eval, job.seed)
                        .map(report::Outcome::Ceiling),
                    Some(method) => train::train_student(
                        method,
                        job.vid,
                        self.sched,
                        self.weights,
                        &cell,
                        eval,
                        probe,
                        job.seed,
                    )
                    .map(report::Outcome::Student),
                };
                drop(cell);
                cells.release(job.m, job.seed);
                outcome.with_context(|| format!("{} M={} seed {}", job.column, job.m, job.seed))
            },
            |job, o, seconds| {
                report::describe(job.phase, job.column, job.vid, job.m, job.seed, o, seconds)
            },
        )?;
        Ok(grid
            .iter()
            .zip(outcomes)
            .map(|(job, (outcome, seconds))| RunRecord {
                phase: job.phase,
                column: job.column,
                vid: job.vid,
                m: job.m,
                seed: job.seed,
                outcome,
                seconds,
            })
            .collect())
    }
}
