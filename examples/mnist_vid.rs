//! Knowledge transfer with little data, after Table 2 of Ahn et al., "Variational
//! Information Distillation for Knowledge Transfer" (CVPR 2019), on real MNIST digits, with
//! the paper's protocol scaled to two CPU cores.
//!
//! A CNN teacher is trained on the 3,500-image training pool of the bundled 5,000-digit
//! MNIST subset (`data/mnist_5k.csv.gz`; 100 digits per class are held out for testing and
//! 50 for validation). Students (a smaller CNN, and an MLP: the heterogeneous case) are then
//! trained on M = 350, 70, 35 and 7 images per class (100%, 20%, 10%, 2%) with the paper's
//! methods: the student alone, KD, FitNet, AT, NST, VID-I, KD + AT and KD + VID-I; VID-I on
//! both block outputs through `VidDistiller`, its variance with a learning rate of its own
//! chosen on the validation digits. Several seeds per cell, 95% confidence intervals, paired
//! comparisons, the VID variance over training, and an ablation. Writes Markdown, CSVs and
//! PNG plots.
//!
//! ```text
//! cargo run --release --features experiment --example mnist_vid -- --quick     # about a minute on 2 cores
//! cargo run --release --features experiment --example mnist_vid                # the full run, results/
//! cargo run --release --features experiment --example mnist_vid -- --help
//! ```

#[path = "mnist_vid/chart.rs"]
mod chart;
#[path = "mnist_vid/cli.rs"]
mod cli;
#[path = "mnist_vid/data.rs"]
mod data;
#[path = "mnist_vid/models.rs"]
mod models;
#[path = "mnist_vid/plot.rs"]
mod plot;
#[path = "mnist_vid/pool.rs"]
mod pool;
#[path = "mnist_vid/report.rs"]
mod report;
#[path = "mnist_vid/stats.rs"]
mod stats;
#[path = "mnist_vid/transfer.rs"]
mod transfer;

use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use tch::nn;

use data::{Dataset, Rng, POOL_PER_CLASS};
use models::{Layers, RunData, RunSpec, Schedule, StudentKind, Teacher, VidInit, Weights};
use report::{Ablation, Phase, RunRecord};
use transfer::Method;

/// Knowledge transfer with little data (Ahn et al. 2019, Table 2) on real MNIST digits:
/// a CNN teacher, CNN and MLP students, the paper's eight methods, four training-set sizes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A short demonstration: short training, one seed, no selection on the validation
    /// digits (the variance takes --variance-lr or 0.5) and no ablation. Writes to
    /// target/mnist_vid_quick unless --out is given.
    #[arg(long)]
    quick: bool,

    #[command(flatten)]
    common: cli::Common,

    /// Seeds per cell; seed s draws the same training subset for every method, so methods
    /// are compared in pairs [default: 5; 1 with --quick].
    #[arg(long)]
    seeds: Option<u64>,

    /// Training images per class for the students, comma-separated (at most 350).
    #[arg(long, value_delimiter = ',', default_value = "350,70,35,7")]
    samples: Vec<i64>,

    /// Students to train, comma-separated: cnn, mlp.
    #[arg(long, value_delimiter = ',', default_value = "cnn,mlp")]
    students: Vec<String>,

    /// Methods, comma-separated: student, kd, fitnet, at, nst, vid, kd+at, kd+vid.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "student,kd,fitnet,at,nst,vid,kd+at,kd+vid"
    )]
    methods: Vec<String>,

    /// Student training length: epochs over its subset... [default: 20; 3 with --quick]
    #[arg(long)]
    epochs: Option<usize>,

    /// ...but at least this many optimiser steps [default: 400; 60 with --quick].
    #[arg(long)]
    min_steps: Option<usize>,

    /// Teacher training epochs over the 3,500-image pool [default: 15; 2 with --quick].
    #[arg(long)]
    teacher_epochs: Option<usize>,

    /// Batch size [default: 64 on the CPU (the reference implementations'), 256 on a GPU].
    #[arg(long)]
    batch: Option<i64>,

    /// Student width multiplier (channels of the CNN, hidden units of the MLP)
    /// [default: 1 on the CPU, 4 on a GPU].
    #[arg(long)]
    width: Option<i64>,

    /// Candidate learning rates of the VID variance, chosen per student and M by VID-I's
    /// accuracy on the validation digits.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.5,5")]
    variance_lr_candidates: Vec<f64>,

    /// Seeds per candidate in that choice (their subsets differ from the test seeds').
    #[arg(long, default_value_t = 2)]
    selection_seeds: u64,

    /// Skip the choice: this learning rate for the VID variance everywhere.
    #[arg(long)]
    variance_lr: Option<f64>,

    /// M values of the ablation [default: 7; none with --quick]; given with no value, none.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    ablation_samples: Option<Vec<i64>>,

    /// VID initial per-channel variance (the reference implementations' 5.0).
    #[arg(long, default_value_t = 5.0)]
    vid_init_variance: f64,

    /// libtorch threads per run. The models are small: one run per core beats one run on
    /// several cores.
    #[arg(long, default_value_t = 1)]
    threads: i32,
}

/// One run of the grid: what to train, on what, and which evaluation it feeds.
#[derive(Clone, Copy)]
struct Job {
    phase: Phase,
    spec: RunSpec,
    m: i64,
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    tch::set_num_threads(args.threads);
    let quick = args.quick;
    let device = args.common.device()?;
    let on_gpu = device.is_cuda();
    let seeds = args.seeds.unwrap_or(if quick { 1 } else { 5 });
    let sched = Schedule {
        lr: args.common.lr,
        momentum: args.common.momentum,
        weight_decay: args.common.weight_decay,
        batch: args.batch.unwrap_or(if on_gpu { 256 } else { 64 }),
        epochs: args.epochs.unwrap_or(if quick { 3 } else { 20 }),
        min_steps: args.min_steps.unwrap_or(if quick { 60 } else { 400 }),
    };
    let teacher_epochs = args.teacher_epochs.unwrap_or(if quick { 2 } else { 15 });
    let width = args.width.unwrap_or(if on_gpu { 4 } else { 1 });
    let jobs = args.common.jobs(device);
    let weights = Weights {
        temperature: args.common.temperature,
        fitnet: args.common.fitnet_weight,
        at: args.common.at_weight,
        nst: args.common.nst_weight,
        vid_lambda: args.common.vid_lambda,
        vid_init_variance: args.vid_init_variance,
    };
    let ablation_samples =
        args.ablation_samples
            .clone()
            .unwrap_or(if quick { vec![] } else { vec![7] });
    let out = args.common.out_dir("mnist_vid", quick);
    let students: Vec<StudentKind> = cli::parse_list(&args.students)?;
    let methods: Vec<Method> = cli::parse_list(&args.methods)?;
    let max_m = POOL_PER_CLASS as i64;
    if args
        .samples
        .iter()
        .chain(&ablation_samples)
        .any(|&m| !(1..=max_m).contains(&m))
    {
        bail!("--samples and --ablation-samples must lie in 1..={max_m} per class");
    }
    if width < 1 || sched.batch < 1 || jobs < 1 {
        bail!("--width, --batch and --jobs must be at least 1");
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

    // ---- teacher -------------------------------------------------------------------
    tch::manual_seed(0);
    let t_vs = nn::VarStore::new(device);
    let teacher = Teacher::new(&t_vs.root() / "teacher");
    let to_dev = |(x, y): (tch::Tensor, tch::Tensor)| (x.to_device(device), y.to_device(device));
    let (pool_x, pool_y) = to_dev(ds.train_pool());
    let (val_x, val_y) = to_dev(ds.validation());
    let (test_x, test_y) = to_dev(ds.test());
    let t_started = Instant::now();
    let t_sched = Schedule {
        epochs: teacher_epochs,
        min_steps: 0,
        ..sched
    };
    let pb = pool::bar(t_sched.steps(pool_x.size()[0]) as u64, "teacher");
    models::train_teacher(&teacher, &t_vs, &t_sched, &pool_x, &pool_y, || pb.inc(1))?;
    pb.finish_and_clear();
    let teacher_on = |x: &tch::Tensor| tch::no_grad(|| teacher.forward_t(x, false)).detach();
    let (teacher_pool, teacher_val, teacher_test) =
        (teacher_on(&pool_x), teacher_on(&val_x), teacher_on(&test_x));
    let teacher_acc = transfer::accuracy(&teacher_test.logits, &test_y);
    let teacher_seconds = t_started.elapsed().as_secs_f64();
    eprintln!(
        "teacher: test accuracy {:.2}% after {teacher_epochs} epochs ({teacher_seconds:.1} s)",
        100.0 * teacher_acc
    );
    let test_data = RunData {
        device,
        width,
        pool_x,
        pool_y,
        teacher_pool,
        eval_x: test_x,
        eval_y: test_y,
        teacher_eval: teacher_test,
    };
    let val_data = RunData {
        eval_x: val_x,
        eval_y: val_y,
        teacher_eval: teacher_val,
        ..test_data.share()
    };

    let spec = |kind, method| RunSpec {
        kind,
        method,
        layers: Layers::All,
        vid_init: VidInit::Reference,
        variance_lr: None,
        trace_variance: false,
    };
    let any_vid = methods.iter().any(|m| m.uses_vid());

    // ---- the variance's learning rate, chosen on the validation digits ----------------
    let mut records: Vec<RunRecord> = Vec::new();
    let fixed_lr = args.variance_lr.or(quick.then_some(0.5));
    if let Some(lr) = fixed_lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
        bail!("--variance-lr must be finite and > 0, got {lr}");
    }
    let mut selection_jobs = Vec::new();
    if fixed_lr.is_none() && any_vid {
        for &kind in &students {
            for &m in &args.samples {
                for &lr in &args.variance_lr_candidates {
                    for s in 0..args.selection_seeds {
                        selection_jobs.push(Job {
                            phase: Phase::Selection,
                            spec: RunSpec {
                                variance_lr: Some(lr),
                                ..spec(kind, Method::Vid)
                            },
                            m,
                            seed: 100 + s,
                        });
                    }
                }
            }
        }
    }
    records.extend(run_all(
        selection_jobs,
        "choice",
        jobs,
        &ds,
        &sched,
        &weights,
        &test_data,
        &val_data,
    )?);
    let chosen = |kind: StudentKind, m: i64| -> Option<f64> {
        fixed_lr.or_else(|| report::chosen_variance_lr(&records, kind, m))
    };

    // ---- the table, and the ablation -------------------------------------------------
    let mut grid = Vec::new();
    for &kind in &students {
        for &m in &args.samples {
            for &method in methods.iter().filter(|m| m.applies_to(kind)) {
                for seed in 0..seeds {
                    let variance_lr = if method.uses_vid() {
                        chosen(kind, m)
                    } else {
                        None
                    };
                    grid.push(Job {
                        phase: Phase::Main,
                        spec: RunSpec {
                            variance_lr,
                            trace_variance: method == Method::Vid && seed == 0,
                            ..spec(kind, method)
                        },
                        m,
                        seed,
                    });
                }
            }
        }
        for &m in ablation_samples.iter().filter(|_| any_vid) {
            let protocol = RunSpec {
                variance_lr: chosen(kind, m),
                ..spec(kind, Method::Vid)
            };
            let largest = args
                .variance_lr_candidates
                .iter()
                .copied()
                .fold(sched.lr, f64::max);
            for a in Ablation::ALL {
                let variant = a.apply(protocol, largest);
                // A variant that changes nothing (the network's learning rate, or the largest
                // candidate, when the selection chose it) would repeat the protocol's runs:
                // the report says so instead.
                if report::same_training(&variant, &protocol, sched.lr) {
                    continue;
                }
                for seed in 0..seeds {
                    grid.push(Job {
                        phase: Phase::Ablation(a),
                        spec: variant,
                        m,
                        seed,
                    });
                }
            }
        }
    }
    records.extend(run_all(
        grid, "students", jobs, &ds, &sched, &weights, &test_data, &val_data,
    )?);

    // ---- outputs ---------------------------------------------------------------------
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let info = report::RunInfo {
        teacher_accuracy: teacher_acc,
        teacher_epochs,
        teacher_seconds,
        seeds,
        quick,
        device: format!("{device:?}"),
        jobs,
        threads: args.threads,
        width,
        sched,
        weights,
        variance_lr_candidates: args.variance_lr_candidates.clone(),
        selection_seeds: args.selection_seeds,
        fixed_variance_lr: fixed_lr,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::write_csvs(&out, &records)?;
    let table = report::markdown(&records, &students, &methods, &args.samples, &info);
    std::fs::write(out.join("mnist_vid.md"), &table)?;
    plot::accuracy(
        &out.join("mnist_vid.png"),
        &records,
        &students,
        &methods,
        &args.samples,
        teacher_acc,
    )?;
    if records.iter().any(|r| !r.traces.is_empty()) {
        plot::variance(&out.join("mnist_vid_variance.png"), &records, &students)?;
    }
    println!("{table}");
    eprintln!(
        "wrote {}/mnist_vid*.{{csv,md,png}} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Trains every job, `workers` at a time (one thread each), largest M first; returns them
/// in the order given. Results do not depend on `workers`: each run seeds its own weights
/// and batch order.
#[allow(clippy::too_many_arguments)]
fn run_all(
    jobs: Vec<Job>,
    label: &'static str,
    workers: usize,
    ds: &Dataset,
    sched: &Schedule,
    weights: &Weights,
    test_data: &RunData,
    val_data: &RunData,
) -> anyhow::Result<Vec<RunRecord>> {
    let subsets: Vec<Vec<i64>> = jobs
        .iter()
        .map(|job| ds.subset(job.m, &mut Rng::new(1000 + job.seed)))
        .collect();
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].m));
    let indexed: Vec<(usize, Job)> = jobs.iter().copied().enumerate().collect();
    let outcomes = pool::run_jobs(
        &indexed,
        order,
        workers,
        label,
        || (test_data.share(), val_data.share()),
        |(test_data, val_data), &(i, job)| {
            let data = match job.phase {
                Phase::Selection => val_data,
                Phase::Main | Phase::Ablation(_) => test_data,
            };
            models::train_student(&job.spec, sched, weights, data, &subsets[i], job.seed)
                .with_context(|| {
                    let s = &job.spec;
                    format!("{} {} M={} seed {}", s.kind, s.method, job.m, job.seed)
                })
        },
        |&(_, job), o, seconds| report::describe(&job.spec, job.phase, job.m, job.seed, o, seconds),
    )?;
    Ok(jobs
        .iter()
        .zip(outcomes)
        .map(|(job, (o, seconds))| RunRecord {
            phase: job.phase,
            spec: job.spec,
            samples_per_class: job.m,
            seed: job.seed,
            accuracy: o.accuracy,
            steps: o.steps,
            final_variance: o.final_variance,
            traces: o.traces,
            seconds,
        })
        .collect())
}
