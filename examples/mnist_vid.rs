//! Knowledge transfer with little data, after Table 2 of Ahn et al., "Variational
//! Information Distillation for Knowledge Transfer" (CVPR 2019), on real MNIST digits.
//!
//! A CNN teacher is trained on 400 images per class of the bundled 5,000-digit MNIST
//! subset (`data/mnist_5k.csv.gz`; 100 per class are held out for testing). Students (a
//! smaller CNN, and an MLP: the heterogeneous case) are then trained on M = 400, 80, 40
//! and 8 images per class (100%, 20%, 10%, 2%) alone, with KD, FitNet, AT, VID-I, and
//! KD + VID-I, over several seeds. Writes a Markdown table, a CSV and a PNG plot.
//!
//! ```text
//! cargo run --release --example mnist_vid -- --quick     # about a minute on 2 cores
//! cargo run --release --example mnist_vid                # the full run, results/ (< 20 min)
//! cargo run --release --example mnist_vid -- --help
//! ```

#[path = "mnist_vid/data.rs"]
mod data;
#[path = "mnist_vid/models.rs"]
mod models;
#[path = "mnist_vid/plot.rs"]
mod plot;
#[path = "mnist_vid/report.rs"]
mod report;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use data::{Dataset, Rng};
use models::{Method, StudentKind, Teacher, TeacherOutputs, TrainSettings};
use report::RunResult;

/// Knowledge transfer with little data (Ahn et al. 2019, Table 2) on real MNIST digits:
/// a CNN teacher, CNN and MLP students, six methods, four training-set sizes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A short demonstration: fewer teacher epochs and student steps, one seed
    /// (about a minute on 2 CPU cores). Writes to target/mnist_vid_quick unless --out is given.
    #[arg(long)]
    quick: bool,

    /// The MNIST CSV (gzip): 785 integers a line, 784 pixels then the label.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist_5k.csv.gz"))]
    data: PathBuf,

    /// Where to write mnist_vid.csv, mnist_vid.md and mnist_vid.png
    /// [default: results/ of the crate; target/mnist_vid_quick with --quick].
    #[arg(long)]
    out: Option<PathBuf>,

    /// Seeds per cell (student, method, M) [default: 4; 1 with --quick].
    #[arg(long)]
    seeds: Option<u64>,

    /// Training images per class for the students, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "400,80,40,8")]
    samples: Vec<i64>,

    /// Students to train, comma-separated: cnn, mlp.
    #[arg(long, value_delimiter = ',', default_value = "cnn,mlp")]
    students: Vec<String>,

    /// Methods to run, comma-separated: student, kd, fitnet, at, vid, kd+vid.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "student,kd,fitnet,at,vid,kd+vid"
    )]
    methods: Vec<String>,

    /// Optimiser steps per student (batch 64) [default: 400; 80 with --quick].
    #[arg(long)]
    steps: Option<usize>,

    /// Teacher training epochs over its 4,000 images [default: 10; 2 with --quick].
    #[arg(long)]
    teacher_epochs: Option<usize>,

    /// Adam learning rate of students and of their auxiliary modules (regressors, log_scale).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,

    /// VID weight lambda (the reference implementations' 1.0).
    #[arg(long, default_value_t = 1.0)]
    vid_lambda: f64,

    /// VID initial per-channel variance (the reference implementations' 5.0).
    #[arg(long, default_value_t = 5.0)]
    vid_init_variance: f64,

    /// Adam learning rate of the VID variance (`log_scale`, in an optimizer group of its
    /// own) [default: --lr]. At 1e-3 the variance moves by at most about 0.001 per step
    /// (Adam's step is about its learning rate), so hundreds of steps barely move it from 5.
    #[arg(long)]
    vid_lr: Option<f64>,

    /// KD temperature.
    #[arg(long, default_value_t = 4.0)]
    temperature: f64,

    /// FitNet hint weight (the reference implementations' 100).
    #[arg(long, default_value_t = 100.0)]
    fitnet_weight: f64,

    /// Attention-transfer weight (the reference implementations' 1000).
    #[arg(long, default_value_t = 1000.0)]
    at_weight: f64,

    /// CPU threads for libtorch. The models are small: one thread is nearly as fast as two,
    /// and stays fast when other programs share the cores (libtorch's waiting threads slow
    /// down many-fold on an oversubscribed machine).
    #[arg(long, default_value_t = 1)]
    threads: i32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    tch::set_num_threads(args.threads);
    let quick = args.quick;
    let seeds = args.seeds.unwrap_or(if quick { 1 } else { 4 });
    let steps = args.steps.unwrap_or(if quick { 80 } else { 400 });
    let teacher_epochs = args.teacher_epochs.unwrap_or(if quick { 2 } else { 10 });
    let out = args.out.clone().unwrap_or_else(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if quick {
            root.join("target/mnist_vid_quick")
        } else {
            root.join("results")
        }
    });
    let students: Vec<StudentKind> = args
        .students
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let methods: Vec<Method> = args
        .methods
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if args.samples.iter().any(|&m| !(1..=400).contains(&m)) {
        anyhow::bail!("--samples must lie in 1..=400 per class");
    }

    let ds = Dataset::load(&args.data)?;
    eprintln!(
        "data: {} images ({} train pool, {} test) from {}",
        ds.len(),
        ds.train_pool_len(),
        ds.test_len(),
        args.data.display()
    );

    // ---- teacher -------------------------------------------------------------------
    tch::manual_seed(0);
    let t_vs = nn::VarStore::new(Device::Cpu);
    let teacher = Teacher::new(&t_vs.root() / "teacher");
    let (train_x, train_y) = ds.train_pool();
    let (test_x, test_y) = ds.test();
    let t_started = Instant::now();
    {
        let mut opt = nn::Adam::default().build(&t_vs, 1e-3)?;
        let n = train_x.size()[0];
        let batches = (n + 63) / 64;
        let pb = bar(teacher_epochs as u64 * batches as u64, "teacher");
        for epoch in 0..teacher_epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            for b in 0..batches {
                let idx = perm.narrow(0, b * 64, 64.min(n - b * 64));
                let x = train_x.index_select(0, &idx);
                let y = train_y.index_select(0, &idx);
                let loss = teacher
                    .forward_t(&x, true)
                    .logits
                    .cross_entropy_for_logits(&y);
                opt.backward_step(&loss);
                pb.inc(1);
            }
            pb.set_message(format!("epoch {}", epoch + 1));
        }
        pb.finish_and_clear();
    }
    let teacher_acc =
        tch::no_grad(|| models::accuracy(&teacher.forward_t(&test_x, false).logits, &test_y));
    let t_out: TeacherOutputs = tch::no_grad(|| teacher.forward_t(&train_x, false)).detach();
    eprintln!(
        "teacher: test accuracy {:.2}% after {} epochs ({:.1} s)",
        100.0 * teacher_acc,
        teacher_epochs,
        t_started.elapsed().as_secs_f64()
    );

    // ---- students --------------------------------------------------------------------
    let settings = TrainSettings {
        steps,
        batch: 64,
        lr: args.lr,
        temperature: args.temperature,
        vid_lambda: args.vid_lambda,
        vid_init_variance: args.vid_init_variance,
        vid_lr: args.vid_lr,
        fitnet_weight: args.fitnet_weight,
        at_weight: args.at_weight,
    };
    let mut cells = Vec::new();
    for &student in &students {
        for &m in &args.samples {
            for &method in &methods {
                if method.applies_to(student) {
                    for seed in 0..seeds {
                        cells.push((student, m, method, seed));
                    }
                }
            }
        }
    }
    let pb = bar(cells.len() as u64, "students");
    let mut results = Vec::new();
    for (student, m, method, seed) in cells {
        pb.set_message(format!("{student} {method} M={m} seed {seed}"));
        let run_started = Instant::now();
        let mut rng = Rng::new(1000 + seed);
        let subset = ds.subset(m, &mut rng);
        tch::manual_seed(10_000 + seed as i64);
        let r = models::train_student(
            student, method, &settings, &train_x, &train_y, &t_out, &subset, &test_x, &test_y,
        )?;
        let res = RunResult {
            student,
            method,
            samples_per_class: m,
            seed,
            test_accuracy: r.test_accuracy,
            vid_variance: r.vid_variance,
            seconds: run_started.elapsed().as_secs_f64(),
        };
        let line = format!(
            "{student:>3} {:<10} M={m:<3} seed {seed}: {:.2}%{} ({:.1} s)",
            method.to_string(),
            100.0 * res.test_accuracy,
            res.vid_variance
                .zip(r.vid_variance_range)
                .map(|(v, (lo, hi))| format!(
                    ", final VID variance mean {v:.3} (channels {lo:.2}-{hi:.2})"
                ))
                .unwrap_or_default(),
            res.seconds
        );
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
        results.push(res);
        pb.inc(1);
    }
    pb.finish_and_clear();

    // ---- outputs ---------------------------------------------------------------------
    std::fs::create_dir_all(&out)?;
    let info = report::RunInfo {
        teacher_accuracy: teacher_acc,
        teacher_epochs,
        steps,
        seeds,
        quick,
        threads: args.threads,
        settings,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::write_csv(&out.join("mnist_vid.csv"), &results)?;
    let table = report::markdown(&results, &students, &methods, &args.samples, &info);
    std::fs::write(out.join("mnist_vid.md"), &table)?;
    plot::plot(
        &out.join("mnist_vid.png"),
        &results,
        &students,
        &methods,
        &args.samples,
        teacher_acc,
    )?;
    println!("{table}");
    eprintln!(
        "wrote {}/mnist_vid.{{csv,md,png}} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bar(len: u64, prefix: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len).with_prefix(prefix);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}
