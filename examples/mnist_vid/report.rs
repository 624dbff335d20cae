//! The records of every run, their statistics, the CSVs and the Markdown report.

use std::fmt::Write as _;
use std::path::Path;

use crate::data::POOL_PER_CLASS;
use crate::models::{
    Layers, RunOutcome, RunSpec, Schedule, StudentKind, VarianceTrace, VidInit, Weights,
};
use crate::stats::{csv_record, fmt_ci, mean_ci, paired, values};
use crate::transfer::Method;

/// Which part of the experiment a run belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Choosing the variance's learning rate: evaluated on the validation digits.
    Selection,
    /// The table: evaluated on the test digits.
    Main,
    /// A variant of VID-I: evaluated on the test digits.
    Ablation(Ablation),
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Selection => "selection",
            Phase::Main => "main",
            Phase::Ablation(_) => "ablation",
        }
    }
}

/// What an ablation run changes in VID-I's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ablation {
    OneLayer,
    NetworkLr,
    LargestLr,
    TchInit,
}

impl Ablation {
    pub const ALL: [Ablation; 4] = [
        Ablation::OneLayer,
        Ablation::NetworkLr,
        Ablation::LargestLr,
        Ablation::TchInit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Ablation::OneLayer => "one layer pair (the last block)",
            Ablation::NetworkLr => "variance at the network's learning rate",
            Ablation::LargestLr => "variance at the largest candidate learning rate",
            Ablation::TchInit => "regressor with tch's default init (2.45x wider)",
        }
    }

    /// The protocol's VID-I run `protocol` with this change; `largest`: the largest
    /// candidate learning rate of the variance.
    pub fn apply(self, protocol: RunSpec, largest: f64) -> RunSpec {
        match self {
            Ablation::OneLayer => RunSpec {
                layers: Layers::Last,
                ..protocol
            },
            Ablation::NetworkLr => RunSpec {
                variance_lr: None,
                ..protocol
            },
            Ablation::LargestLr => RunSpec {
                variance_lr: Some(largest),
                ..protocol
            },
            Ablation::TchInit => RunSpec {
                vid_init: VidInit::TchDefault,
                ..protocol
            },
        }
    }
}

const PROTOCOL: &str = "protocol (both blocks, chosen learning rate, reference init)";

/// Whether two runs train identically: the same student, method, layers and init, and the
/// same learning rate of the variance once `None` is read as the network's (`network_lr`).
pub fn same_training(a: &RunSpec, b: &RunSpec, network_lr: f64) -> bool {
    a.kind == b.kind
        && a.method == b.method
        && a.layers == b.layers
        && a.vid_init == b.vid_init
        && a.variance_lr.unwrap_or(network_lr) == b.variance_lr.unwrap_or(network_lr)
}

pub struct RunRecord {
    pub phase: Phase,
    pub spec: RunSpec,
    pub samples_per_class: i64,
    pub seed: u64,
    /// On the validation digits (selection) or the test digits.
    pub accuracy: f64,
    pub steps: usize,
    pub final_variance: Vec<f64>,
    pub traces: Vec<VarianceTrace>,
    pub seconds: f64,
}

pub struct RunInfo {
    pub teacher_accuracy: f64,
    pub teacher_epochs: usize,
    pub teacher_seconds: f64,
    pub seeds: u64,
    pub quick: bool,
    pub device: String,
    pub jobs: usize,
    pub threads: i32,
    pub width: i64,
    pub sched: Schedule,
    pub weights: Weights,
    pub variance_lr_candidates: Vec<f64>,
    pub selection_seeds: u64,
    pub fixed_variance_lr: Option<f64>,
    pub wall_seconds: f64,
}

/// The ablation's name of a run's VID-I variant.
fn variant(phase: Phase) -> &'static str {
    match phase {
        Phase::Ablation(a) => a.name(),
        _ => PROTOCOL,
    }
}

/// One line of the progress log.
pub fn describe(
    spec: &RunSpec,
    phase: Phase,
    m: i64,
    seed: u64,
    o: &RunOutcome,
    seconds: f64,
) -> String {
    let mut s = format!(
        "{:<9} {} {:<10} M={m:<3} seed {seed:<3}: {:.2}%",
        phase.name(),
        spec.kind,
        spec.method.to_string(),
        100.0 * o.accuracy
    );
    if let Phase::Ablation(a) = phase {
        let _ = write!(s, " [{}]", a.name());
    }
    if let Some(lr) = spec.variance_lr.filter(|_| spec.method.uses_vid()) {
        let _ = write!(s, ", variance lr {lr}");
    }
    if !o.final_variance.is_empty() {
        let v: Vec<String> = o.final_variance.iter().map(|v| format!("{v:.3}")).collect();
        let _ = write!(s, ", final variance {}", v.join(" / "));
    }
    let _ = write!(s, " ({} steps, {seconds:.1} s)", o.steps);
    s
}

/// Test accuracies (%) of the table's cell, by seed.
pub fn main_cell(
    records: &[RunRecord],
    kind: StudentKind,
    method: Method,
    m: i64,
) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter(|r| {
            r.phase == Phase::Main
                && r.spec.kind == kind
                && r.spec.method == method
                && r.samples_per_class == m
        })
        .map(|r| (r.seed, 100.0 * r.accuracy))
        .collect()
}

/// The candidate with the best mean validation accuracy of VID-I (the smallest on a tie).
pub fn chosen_variance_lr(records: &[RunRecord], kind: StudentKind, m: i64) -> Option<f64> {
    let mut best: Option<(f64, f64)> = None;
    for (lr, acc) in selection_means(records, kind, m) {
        if best.map_or(true, |(_, b)| acc > b) {
            best = Some((lr, acc));
        }
    }
    best.map(|(lr, _)| lr)
}

/// (learning rate, mean validation accuracy) per candidate, by increasing learning rate.
fn selection_means(records: &[RunRecord], kind: StudentKind, m: i64) -> Vec<(f64, f64)> {
    let mut lrs: Vec<f64> = records
        .iter()
        .filter(|r| r.phase == Phase::Selection && r.spec.kind == kind && r.samples_per_class == m)
        .filter_map(|r| r.spec.variance_lr)
        .collect();
    lrs.sort_by(f64::total_cmp);
    lrs.dedup();
    lrs.into_iter()
        .map(|lr| {
            let accs: Vec<f64> = records
                .iter()
                .filter(|r| {
                    r.phase == Phase::Selection
                        && r.spec.kind == kind
                        && r.samples_per_class == m
                        && r.spec.variance_lr == Some(lr)
                })
                .map(|r| r.accuracy)
                .collect();
            (lr, accs.iter().sum::<f64>() / accs.len() as f64)
        })
        .collect()
}

/// mnist_vid.csv (every run), mnist_vid_variance.csv (the variance over training) and
/// mnist_vid_variance_fit.csv (per channel at the end: variance and residuals).
pub fn write_csvs(dir: &Path, records: &[RunRecord]) -> anyhow::Result<()> {
    let mut runs = String::from(
        "phase,student,method,variant,samples_per_class,seed,evaluated_on,accuracy_pct,\
         variance_lr,final_variance_per_layer,steps,seconds\n",
    );
    let mut dynamics = String::from("student,samples_per_class,layer,step,mean_variance\n");
    let mut fit = String::from(
        "student,samples_per_class,layer,channel,variance,residual_train,residual_test\n",
    );
    for r in records {
        let v: Vec<String> = r.final_variance.iter().map(|v| format!("{v:.5}")).collect();
        runs += &csv_record(&[
            r.phase.name().to_string(),
            r.spec.kind.to_string(),
            r.spec.method.to_string(),
            if r.spec.method.uses_vid() {
                variant(r.phase).to_string()
            } else {
                String::new()
            },
            r.samples_per_class.to_string(),
            r.seed.to_string(),
            if r.phase == Phase::Selection {
                "validation"
            } else {
                "test"
            }
            .to_string(),
            format!("{:.2}", 100.0 * r.accuracy),
            r.spec
                .variance_lr
                .filter(|_| r.spec.method.uses_vid())
                .map(|lr| lr.to_string())
                .unwrap_or_default(),
            v.join(";"),
            r.steps.to_string(),
            format!("{:.2}", r.seconds),
        ]);
        for (layer, t) in r.traces.iter().enumerate() {
            let (kind, m) = (r.spec.kind, r.samples_per_class);
            for &(step, v) in &t.mean_over_steps {
                writeln!(dynamics, "{kind},{m},{},{step},{v:.5}", layer + 1)?;
            }
            for (c, ((v, a), b)) in t
                .variance
                .iter()
                .zip(&t.residual_train)
                .zip(&t.residual_eval)
                .enumerate()
            {
                writeln!(fit, "{kind},{m},{},{c},{v:.6},{a:.6},{b:.6}", layer + 1)?;
            }
        }
    }
    std::fs::write(dir.join("mnist_vid.csv"), runs)?;
    std::fs::write(dir.join("mnist_vid_variance.csv"), dynamics)?;
    std::fs::write(dir.join("mnist_vid_variance_fit.csv"), fit)?;
    Ok(())
}

fn student_title(kind: StudentKind) -> &'static str {
    match kind {
        StudentKind::Cnn => "CNN student (CNN teacher -> smaller CNN)",
        StudentKind::Mlp => "MLP student (CNN teacher -> MLP, heterogeneous)",
    }
}

fn m_label(m: i64) -> String {
    format!("{m} ({}%)", 100.0 * m as f64 / POOL_PER_CLASS as f64)
}

fn table_head(s: &mut String, first: &str, columns: &[String]) {
    let _ = write!(s, "| {first} |");
    for c in columns {
        let _ = write!(s, " {c} |");
    }
    let _ = write!(s, "\n|---|");
    for _ in columns {
        s.push_str("---|");
    }
    s.push('\n');
}

/// Pearson correlation.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

pub fn markdown(
    records: &[RunRecord],
    students: &[StudentKind],
    methods: &[Method],
    samples: &[i64],
    info: &RunInfo,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Test accuracy (%) on the 1,000 held-out MNIST digits: mean ± half-width of the 95% \
         confidence interval (Student t) over {} seed{}; seed s draws the same training subset \
         and the same initial student for every method. Teacher (CNN, 3,500 images, {} \
         epochs): {:.2}%.{}\n",
        info.seeds,
        if info.seeds == 1 { "" } else { "s" },
        info.teacher_epochs,
        100.0 * info.teacher_accuracy,
        if info.quick {
            " **Quick mode: a demonstration, not the experiment.**"
        } else {
            ""
        }
    );
    for &kind in students {
        let cols: Vec<&Method> = methods.iter().filter(|m| m.applies_to(kind)).collect();
        let _ = writeln!(s, "**{}**\n", student_title(kind));
        table_head(
            &mut s,
            "M (per class)",
            &cols.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
        );
        for &m in samples {
            let stats: Vec<Option<(f64, f64)>> = cols
                .iter()
                .map(|&&method| mean_ci(&values(&main_cell(records, kind, method, m))))
                .collect();
            let best = stats
                .iter()
                .flatten()
                .map(|&(mu, _)| mu)
                .fold(f64::NEG_INFINITY, f64::max);
            let _ = write!(s, "| {} |", m_label(m));
            for st in &stats {
                match st {
                    Some(x) if (x.0 - best).abs() < 1e-9 => {
                        let _ = write!(s, " **{}** |", fmt_ci(*x, false));
                    }
                    Some(x) => {
                        let _ = write!(s, " {} |", fmt_ci(*x, false));
                    }
                    None => s.push_str(" n/a |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }

    // paired comparisons
    let pairs = [(Method::Vid, Method::Student), (Method::KdVid, Method::Kd)];
    if pairs
        .iter()
        .any(|(a, b)| methods.contains(a) && methods.contains(b))
    {
        let _ = writeln!(
            s,
            "**Paired differences** (percentage points; same seed = same subset and initial \
             student): mean ± 95% CI of the per-seed difference, and the seeds where the first \
             method is ahead / level / behind.\n"
        );
        let mut cols = Vec::new();
        for &kind in students {
            for (a, b) in pairs
                .iter()
                .filter(|(a, b)| methods.contains(a) && methods.contains(b))
            {
                cols.push((kind, *a, *b));
            }
        }
        let names: Vec<String> = cols
            .iter()
            .map(|(k, a, b)| format!("{k}: {a} − {b}"))
            .collect();
        table_head(&mut s, "M (per class)", &names);
        for &m in samples {
            let _ = write!(s, "| {} |", m_label(m));
            for &(kind, a, b) in &cols {
                let d = paired(
                    &main_cell(records, kind, a, m),
                    &main_cell(records, kind, b, m),
                );
                match mean_ci(&d) {
                    Some(x) => {
                        let ahead = d.iter().filter(|&&x| x > 1e-9).count();
                        let behind = d.iter().filter(|&&x| x < -1e-9).count();
                        let level = d.len() - ahead - behind;
                        let _ = write!(s, " {} ({ahead}/{level}/{behind}) |", fmt_ci(x, true));
                    }
                    None => s.push_str(" n/a |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }

    // the variance's learning rate
    if let Some(lr) = info.fixed_variance_lr {
        let _ = writeln!(
            s,
            "Learning rate of the VID variance: {lr} (fixed, not chosen).\n"
        );
    } else if records.iter().any(|r| r.phase == Phase::Selection) {
        let _ = writeln!(
            s,
            "**The VID variance's learning rate**, chosen per student and M by VID-I's mean \
             accuracy (%) on the 500 validation digits over {} seed{} (subsets other than the \
             test seeds'):\n",
            info.selection_seeds,
            if info.selection_seeds == 1 { "" } else { "s" }
        );
        let names: Vec<String> = info
            .variance_lr_candidates
            .iter()
            .map(|lr| format!("lr {lr}"))
            .collect();
        let mut names = names;
        names.push("chosen".into());
        table_head(&mut s, "student, M", &names);
        for &kind in students {
            for &m in samples {
                let means = selection_means(records, kind, m);
                let _ = write!(s, "| {kind}, {m} |");
                for &(_, acc) in &means {
                    let _ = write!(s, " {:.2} |", 100.0 * acc);
                }
                let _ = writeln!(
                    s,
                    " {} |",
                    chosen_variance_lr(records, kind, m).map_or("n/a".into(), |lr| lr.to_string())
                );
            }
        }
        s.push('\n');
    }

    // the variance: where it ends, and whether it meets the residual error
    let traced: Vec<&RunRecord> = records.iter().filter(|r| !r.traces.is_empty()).collect();
    if !traced.is_empty() {
        let _ = writeln!(
            s,
            "**Does the variance learn?** VID-I, seed 0: per layer pair, the mean per-channel \
             variance at the end (initial {}), the mean squared residual of the regressed map \
             per channel on the student's training subset and on the test digits, the median \
             ratio variance / training residual over channels (1 when the variance has met the \
             residual, its maximum-likelihood value) and the correlation of their logarithms \
             over channels.\n",
            info.weights.vid_init_variance
        );
        table_head(
            &mut s,
            "student, M, layer",
            &[
                "variance".into(),
                "residual (train)".into(),
                "residual (test)".into(),
                "median variance / residual (train)".into(),
                "corr. of logs".into(),
            ],
        );
        for r in &traced {
            for (l, t) in r.traces.iter().enumerate() {
                let ratio: Vec<f64> = t
                    .variance
                    .iter()
                    .zip(&t.residual_train)
                    .map(|(v, e)| v / e)
                    .collect();
                let logs = |v: &[f64]| v.iter().map(|x| x.ln()).collect::<Vec<_>>();
                let _ = writeln!(
                    s,
                    "| {}, {}, {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
                    r.spec.kind,
                    r.samples_per_class,
                    l + 1,
                    mean(&t.variance),
                    mean(&t.residual_train),
                    mean(&t.residual_eval),
                    median(ratio),
                    correlation(&logs(&t.variance), &logs(&t.residual_train)),
                );
            }
        }
        s.push('\n');
    }

    // the ablation
    let ablation: Vec<&RunRecord> = records
        .iter()
        .filter(|r| matches!(r.phase, Phase::Ablation(_)))
        .collect();
    if !ablation.is_empty() {
        let mut ms: Vec<i64> = ablation.iter().map(|r| r.samples_per_class).collect();
        ms.sort_unstable();
        ms.dedup();
        let kinds: Vec<StudentKind> = students
            .iter()
            .copied()
            .filter(|k| ablation.iter().any(|r| r.spec.kind == *k))
            .collect();
        let _ = writeln!(
            s,
            "**Ablation of VID-I** (test accuracy %, mean ± 95% CI; in brackets the paired \
             difference to the student alone, same seeds):\n"
        );
        let mut cols = Vec::new();
        for &k in &kinds {
            for &m in &ms {
                cols.push((k, m));
            }
        }
        table_head(
            &mut s,
            "variant",
            &cols
                .iter()
                .map(|(k, m)| format!("{k}, M = {m}"))
                .collect::<Vec<_>>(),
        );
        // Every variant: one not run for a column trains exactly as the protocol there.
        let mut variants = vec![PROTOCOL];
        variants.extend(Ablation::ALL.iter().map(|a| a.name()));
        let _ = write!(s, "| (chosen learning rate of the variance) |");
        for &(k, m) in &cols {
            let lr = records
                .iter()
                .find(|r| {
                    r.phase == Phase::Main
                        && r.spec.kind == k
                        && r.samples_per_class == m
                        && r.spec.method == Method::Vid
                })
                .and_then(|r| r.spec.variance_lr);
            let _ = write!(s, " {} |", lr.map_or("n/a".into(), |lr| lr.to_string()));
        }
        s.push('\n');
        let _ = write!(s, "| student alone |");
        for &(k, m) in &cols {
            let st = main_cell(records, k, Method::Student, m);
            let _ = write!(
                s,
                " {} |",
                mean_ci(&values(&st)).map_or("n/a".into(), |x| fmt_ci(x, false))
            );
        }
        s.push('\n');
        for v in variants {
            let _ = write!(s, "| {v} |");
            for &(k, m) in &cols {
                let cell: Vec<(u64, f64)> = records
                    .iter()
                    .filter(|r| {
                        matches!(r.phase, Phase::Main | Phase::Ablation(_))
                            && r.spec.kind == k
                            && r.spec.method == Method::Vid
                            && r.samples_per_class == m
                            && variant(r.phase) == v
                    })
                    .map(|r| (r.seed, 100.0 * r.accuracy))
                    .collect();
                let d = paired(&cell, &main_cell(records, k, Method::Student, m));
                match (mean_ci(&values(&cell)), mean_ci(&d)) {
                    (Some(x), Some(dx)) => {
                        let _ = write!(s, " {} ({}) |", fmt_ci(x, false), fmt_ci(dx, true));
                    }
                    (Some(x), None) => {
                        let _ = write!(s, " {} |", fmt_ci(x, false));
                    }
                    // Not run: the variant trains exactly as the protocol there.
                    _ if v != PROTOCOL => s.push_str(" = protocol |"),
                    _ => s.push_str(" n/a |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }

    let (sc, w) = (&info.sched, &info.weights);
    let runs = records.len();
    let _ = writeln!(
        s,
        "Settings: students trained for max({} epochs, {} steps) of SGD (batch {}, lr {}, \
         momentum {}, weight decay {} on every parameter but the variance), lr x0.1 at 5/8, \
         6/8 and 7/8 of training; teacher {} epochs of the same. KD T = {}, 0.1 CE + 0.9 KD; \
         FitNet {} x MSE (last block, one stage); AT {} and NST {} on both blocks; VID-I lambda \
         {} per pair on both blocks, initial variance {}. Student width x{}. {runs} student \
         runs on {}, {} at once, {} libtorch thread{} each; teacher {:.0} s; wall time {:.1} s \
         ({:.1} min).",
        sc.epochs,
        sc.min_steps,
        sc.batch,
        sc.lr,
        sc.momentum,
        sc.weight_decay,
        info.teacher_epochs,
        w.temperature,
        w.fitnet,
        w.at,
        w.nst,
        w.vid_lambda,
        w.vid_init_variance,
        info.width,
        info.device,
        info.jobs,
        info.threads,
        if info.threads == 1 { "" } else { "s" },
        info.teacher_seconds,
        info.wall_seconds,
        info.wall_seconds / 60.0
    );
    s
}
