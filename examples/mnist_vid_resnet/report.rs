//! The records of every run, the choice of VID-I's variance, the CSVs, the Markdown report
//! with the decision rule applied, and the plot.

use std::fmt::{self, Write as _};
use std::path::Path;

use plotters::prelude::*;

use crate::chart::{accuracy_axes, legend, mean_ci_series, method_color, register_font};
use crate::stats::{csv_record, fmt_ci, mean_ci, paired, values};
use crate::train::{RunOutcome, Schedule, VidSetting, Weights};
use crate::transfer::Method;

/// Which part of the experiment a run belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Choosing VID-I's variance: evaluated on the validation digits.
    Selection,
    /// The table: evaluated on the test digits.
    Main,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Selection => "selection",
            Phase::Main => "main",
        }
    }
}

/// A column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The teacher's frozen trunk with a new head trained on the same images.
    Ceiling,
    /// A method of the paper's Table 2 (VID methods with the chosen variance setting).
    Method(Method),
    /// VID-I with the reference implementations' variance setting.
    VidReference,
}

impl Column {
    /// The method a student column trains with (none for the ceiling).
    pub fn method(self) -> Option<Method> {
        match self {
            Column::Method(m) => Some(m),
            Column::VidReference => Some(Method::Vid),
            Column::Ceiling => None,
        }
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Column::Ceiling => f.pad("Ceiling"),
            Column::Method(m) => f.pad(&m.to_string()),
            Column::VidReference => f.pad("VID-I (init 5)"),
        }
    }
}

/// What a run produced.
pub enum Outcome {
    /// The ceiling's accuracy.
    Ceiling(f64),
    Student(RunOutcome),
}

impl Outcome {
    /// Final accuracy on the evaluation digits.
    pub fn accuracy(&self) -> f64 {
        match self {
            Outcome::Ceiling(a) => *a,
            Outcome::Student(o) => o.accuracy,
        }
    }
    fn student(&self) -> Option<&RunOutcome> {
        match self {
            Outcome::Ceiling(_) => None,
            Outcome::Student(o) => Some(o),
        }
    }
}

pub struct RunRecord {
    pub phase: Phase,
    pub column: Column,
    pub vid: VidSetting,
    pub m: i64,
    pub seed: u64,
    pub outcome: Outcome,
    pub seconds: f64,
}

impl RunRecord {
    fn uses_vid(&self) -> bool {
        self.column.method().is_some_and(Method::uses_vid)
    }
}

pub struct RunInfo {
    pub teacher_accuracy: f64,
    pub teacher_epochs: usize,
    pub teacher_seconds: f64,
    pub seeds: u64,
    pub samples: Vec<i64>,
    pub columns: Vec<Column>,
    pub quick: bool,
    pub device: String,
    pub jobs: usize,
    pub sched: Schedule,
    pub weights: Weights,
    pub selection_samples: Vec<i64>,
    pub selection_seeds: u64,
    pub fixed: Option<VidSetting>,
    pub chosen: VidSetting,
    pub reference: VidSetting,
    pub wall_seconds: f64,
}

fn setting(v: VidSetting) -> String {
    format!(
        "initial variance {}, variance lr {}",
        v.init_variance, v.variance_lr
    )
}

/// One line of the progress log.
pub fn describe(
    phase: Phase,
    column: Column,
    vid: VidSetting,
    m: i64,
    seed: u64,
    o: &Outcome,
    seconds: f64,
) -> String {
    let mut s = format!(
        "{:<9} {:<14} M={m:<3} seed {seed:<3}: {:.2}%",
        phase.name(),
        column.to_string(),
        100.0 * o.accuracy()
    );
    if let Some(o) = o.student() {
        let _ = write!(s, " (best {:.2}%)", 100.0 * o.best_accuracy);
        if column.method().is_some_and(Method::uses_vid) {
            let v: Vec<String> = o.final_variance.iter().map(|v| format!("{v:.3}")).collect();
            let _ = write!(s, ", {}, final variance {}", setting(vid), v.join(" / "));
        }
        if !o.probe_r2.is_empty() {
            let r: Vec<String> = o.probe_r2.iter().map(|r| format!("{r:.3}")).collect();
            let _ = write!(s, ", probe R2 {}", r.join(" / "));
        }
    }
    let _ = write!(s, " [{seconds:.1} s]");
    s
}

/// The candidate with the best validation accuracy of VID-I, averaged over every M and
/// selection seed (one setting for the whole table; the first listed on a tie).
pub fn chosen_setting(records: &[RunRecord]) -> Option<VidSetting> {
    let mut best: Option<(VidSetting, f64)> = None;
    for (v, acc) in selection_means(records) {
        if best.map_or(true, |(_, b)| acc > b) {
            best = Some((v, acc));
        }
    }
    best.map(|(v, _)| v)
}

/// (candidate, mean validation accuracy %) in the order first run.
fn selection_means(records: &[RunRecord]) -> Vec<(VidSetting, f64)> {
    let mut out: Vec<(VidSetting, Vec<f64>)> = Vec::new();
    for r in records.iter().filter(|r| r.phase == Phase::Selection) {
        let acc = 100.0 * r.outcome.accuracy();
        match out.iter_mut().find(|(v, _)| *v == r.vid) {
            Some((_, accs)) => accs.push(acc),
            None => out.push((r.vid, vec![acc])),
        }
    }
    out.into_iter()
        .map(|(v, a)| (v, a.iter().sum::<f64>() / a.len() as f64))
        .collect()
}

/// Test accuracies (%) of a table cell, by seed; `best` for the best checkpoint's.
fn cell(records: &[RunRecord], column: Column, m: i64, best: bool) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter(|r| r.phase == Phase::Main && r.column == column && r.m == m)
        .map(|r| {
            let acc = match (&r.outcome, best) {
                (Outcome::Student(o), true) => o.best_accuracy,
                (o, _) => o.accuracy(),
            };
            (r.seed, 100.0 * acc)
        })
        .collect()
}

/// Writes `mnist_vid_resnet.csv` (every run) and `mnist_vid_resnet_curves.csv` (seed 0's
/// checkpoints).
pub fn write_csvs(dir: &Path, records: &[RunRecord]) -> anyhow::Result<()> {
    let mut runs = csv_record(
        &[
            "phase",
            "column",
            "init_variance",
            "variance_lr",
            "samples_per_class",
            "seed",
            "accuracy",
            "best_accuracy",
            "probe_r2_stage1",
            "probe_r2_stage2",
            "probe_r2_stage3",
            "final_variance_stage1",
            "final_variance_stage2",
            "final_variance_stage3",
            "seconds",
        ]
        .map(String::from),
    );
    let mut curves = csv_record(
        &[
            "column",
            "samples_per_class",
            "seed",
            "step",
            "train_loss",
            "train_accuracy",
            "test_accuracy",
        ]
        .map(String::from),
    );
    let nth = |v: &[f64], i: usize| v.get(i).map_or(String::new(), |x| format!("{x:.6}"));
    for r in records {
        let student = r.outcome.student();
        let (r2, var) = student.map_or((&[][..], &[][..]), |o| {
            (&o.probe_r2[..], &o.final_variance[..])
        });
        let vid = |x: f64| {
            if r.uses_vid() {
                x.to_string()
            } else {
                String::new()
            }
        };
        runs += &csv_record(&[
            r.phase.name().into(),
            r.column.to_string(),
            vid(r.vid.init_variance),
            vid(r.vid.variance_lr),
            r.m.to_string(),
            r.seed.to_string(),
            format!("{:.4}", r.outcome.accuracy()),
            student.map_or(String::new(), |o| format!("{:.4}", o.best_accuracy)),
            nth(r2, 0),
            nth(r2, 1),
            nth(r2, 2),
            nth(var, 0),
            nth(var, 1),
            nth(var, 2),
            format!("{:.1}", r.seconds),
        ]);
        if let (Some(o), Phase::Main, 0) = (student, r.phase, r.seed) {
            for p in &o.curve {
                curves += &csv_record(&[
                    r.column.to_string(),
                    r.m.to_string(),
                    r.seed.to_string(),
                    p.step.to_string(),
                    format!("{:.6}", p.train_loss),
                    format!("{:.4}", p.train_accuracy),
                    format!("{:.4}", p.eval_accuracy),
                ]);
            }
        }
    }
    std::fs::write(dir.join("mnist_vid_resnet.csv"), runs)?;
    std::fs::write(dir.join("mnist_vid_resnet_curves.csv"), curves)?;
    Ok(())
}

/// The decision rule's threshold: a gain, paired with the student, of at least this many
/// points whose 95% interval excludes zero.
const GAIN_POINTS: f64 = 3.0;

/// Paired gain of `column` over the student at `m`: (mean, CI half-width, runs).
fn gain(records: &[RunRecord], column: Column, m: i64) -> Option<(f64, f64, usize)> {
    let d = paired(
        &cell(records, column, m, false),
        &cell(records, Column::Method(Method::Student), m, false),
    );
    mean_ci(&d).map(|(mu, ci)| (mu, ci, d.len()))
}

/// Whether `column` gains at `m` under the rule (needs two seeds or more for an interval).
fn gains(records: &[RunRecord], column: Column, m: i64) -> bool {
    gain(records, column, m).is_some_and(|(mu, ci, _)| mu >= GAIN_POINTS && mu - ci > 0.0)
}

fn table_head(s: &mut String, first: &str, columns: &[String]) {
    let _ = writeln!(s, "| {first} | {} |", columns.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(columns.len()));
}

fn m_label(m: i64) -> String {
    format!("M = {m}")
}

/// The report: set-up, the choice, the tables, the probe, and the decision rule applied.
pub fn markdown(records: &[RunRecord], info: &RunInfo) -> String {
    let mut s = String::new();
    let sched = &info.sched;
    let _ = writeln!(
        s,
        "# Knowledge transfer with little data: residual students, translated digits\n\n\
         Teacher: pre-activation ResNet 32/64/128, {:.2}% test accuracy after {} epochs \
         ({:.0} s). Students: 8/16/32. {} seed(s) per cell; {} SGD steps per run at every M \
         (batch {}, lr {} cosine to 0, momentum {}, weight decay {}); translations of up to \
         2 pixels. Device {}, {} run(s) at once; wall time {:.1} min{}.\n",
        100.0 * info.teacher_accuracy,
        info.teacher_epochs,
        info.teacher_seconds,
        info.seeds,
        sched.steps,
        sched.batch,
        sched.lr,
        sched.momentum,
        sched.weight_decay,
        info.device,
        info.jobs,
        info.wall_seconds / 60.0,
        if info.quick {
            " (--quick: a demonstration, not a result)"
        } else {
            ""
        },
    );
    let w = &info.weights;
    let _ = writeln!(
        s,
        "Weights: KD 0.9 (CE 0.1, T = {}), FitNet {} (middle stage, regressor without ReLU), \
         AT {} and NST {} (every stage), VID-I lambda {} per stage (every stage).\n",
        w.temperature, w.fitnet, w.at, w.nst, w.vid_lambda
    );
    if info.columns.contains(&Column::VidReference) {
        let _ = writeln!(
            s,
            "VID-I (init 5): the reference implementations' variance ({}).\n",
            setting(info.reference)
        );
    }

    // the choice
    match info.fixed {
        Some(v) => {
            let _ = writeln!(s, "VID-I's variance: fixed ({}), not chosen.\n", setting(v));
        }
        None => {
            let means = selection_means(records);
            if !means.is_empty() {
                let _ = writeln!(
                    s,
                    "**VID-I's variance, chosen on the validation digits** (mean validation \
                     accuracy % over M = {:?}, {} seed(s) each; the best is used for VID-I and \
                     KD + VID-I at every M):\n",
                    info.selection_samples, info.selection_seeds
                );
                table_head(
                    &mut s,
                    "initial variance",
                    &["variance lr".into(), "validation accuracy".into()],
                );
                for (v, acc) in means {
                    let mark = if v == info.chosen { " (chosen)" } else { "" };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {acc:.2}{mark} |",
                        v.init_variance, v.variance_lr
                    );
                }
                s.push('\n');
            }
        }
    }

    let ms: Vec<String> = info.samples.iter().map(|&m| m_label(m)).collect();
    for (title, best) in [
        ("Test accuracy (%) at the end of training", false),
        ("Test accuracy (%) at the best of the run's checkpoints (chosen on the test digits: an optimistic figure)", true),
    ] {
        let _ = writeln!(s, "**{title}**, mean ± 95% CI over seeds:\n");
        table_head(&mut s, "method", &ms);
        for &c in &info.columns {
            let _ = write!(s, "| {c} |");
            for &m in &info.samples {
                let v = values(&cell(records, c, m, best));
                let _ = write!(s, " {} |", mean_ci(&v).map_or("n/a".into(), |x| fmt_ci(x, false)));
            }
            s.push('\n');
        }
        let _ = writeln!(s, "| Teacher | {} |\n", vec![format!("{:.2}", 100.0 * info.teacher_accuracy); ms.len()].join(" | "));
    }

    let _ = writeln!(
        s,
        "**Paired with the student** (same seed: same images, same initial student): gain in \
         points, mean ± 95% CI (runs):\n"
    );
    table_head(&mut s, "method", &ms);
    for &c in info
        .columns
        .iter()
        .filter(|&&c| c != Column::Method(Method::Student))
    {
        let _ = write!(s, "| {c} |");
        for &m in &info.samples {
            let cell_text = gain(records, c, m).map_or("n/a".into(), |(mu, ci, n)| {
                let bold = if gains(records, c, m) { "**" } else { "" };
                format!("{bold}{}{bold} ({n})", fmt_ci((mu, ci), true))
            });
            let _ = write!(s, " {cell_text} |");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\nIn bold: a gain under the decision rule (at least {GAIN_POINTS} points, 95% interval above 0).\n"
    );

    // the probe
    let _ = writeln!(
        s,
        "**What transferred**: test R² of the least-squares 1x1 linear map (fitted on the \
         validation digits) from the student's stage output to the teacher's, per stage \
         (1 / 2 / 3), mean over seeds:\n"
    );
    table_head(&mut s, "method", &ms);
    for &c in info.columns.iter().filter(|&&c| c != Column::Ceiling) {
        let _ = write!(s, "| {c} |");
        for &m in &info.samples {
            let runs: Vec<&RunOutcome> = records
                .iter()
                .filter(|r| r.phase == Phase::Main && r.column == c && r.m == m)
                .filter_map(|r| r.outcome.student())
                .filter(|o| o.probe_r2.len() == 3)
                .collect();
            if runs.is_empty() {
                s.push_str(" n/a |");
                continue;
            }
            let stage =
                |l: usize| runs.iter().map(|o| o.probe_r2[l]).sum::<f64>() / runs.len() as f64;
            let _ = write!(s, " {:.3} / {:.3} / {:.3} |", stage(0), stage(1), stage(2));
        }
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&verdict(records, info));
    s
}

/// The decision rule written in EXPERIMENT.md before the results, applied.
fn verdict(records: &[RunRecord], info: &RunInfo) -> String {
    let small: Vec<i64> = info.samples.iter().copied().filter(|&m| m <= 7).collect();
    let mut s = String::from("**The decision rule, applied** (M <= 7):\n\n");
    if info.seeds < 2 || small.is_empty() {
        s.push_str("- Not applied: it needs two seeds or more and an M of 7 or less.\n");
        return s;
    }
    let student = Column::Method(Method::Student);
    let premise: Vec<String> = small
        .iter()
        .filter_map(|&m| {
            let c = mean_ci(&values(&cell(records, Column::Ceiling, m, false)))?.0;
            let st = mean_ci(&values(&cell(records, student, m, false)))?.0;
            (c - st >= GAIN_POINTS)
                .then(|| format!("M = {m} (ceiling {c:.1}% vs student {st:.1}%)"))
        })
        .collect();
    let gaining = |column: Column| -> Vec<i64> {
        small
            .iter()
            .copied()
            .filter(|&m| gains(records, column, m))
            .collect()
    };
    let feature = [Method::FitNet, Method::At].map(|m| (m, gaining(Column::Method(m))));
    let vid = gaining(Column::Method(Method::Vid));
    let _ = writeln!(
        s,
        "- Premise (the ceiling at least {GAIN_POINTS} points above the student): {}.",
        if premise.is_empty() {
            "not met".to_string()
        } else {
            format!("met at {}", premise.join(", "))
        }
    );
    for (m, at) in &feature {
        let _ = writeln!(s, "- {m} gains at M = {at:?}.");
    }
    let _ = writeln!(s, "- VID-I gains at M = {vid:?}.");
    let others_gain = feature.iter().any(|(_, at)| !at.is_empty());
    let reading = if premise.is_empty() {
        "the teacher's features are not worth 3 points here: the setting lacks the premise, \
         and says nothing about VID."
    } else if !vid.is_empty() {
        "VID-I transfers here: the paper's direction reproduces in this setting."
    } else if others_gain {
        "FitNet or AT transfers and VID-I does not: VID is at fault in this setting."
    } else {
        "no feature method transfers although the ceiling says the features are worth it: \
         the setting still lacks the premise for feature transfer."
    };
    let _ = writeln!(s, "- **Reading: {reading}**");
    s
}

/// Mean test accuracy against M per column (log scale), and seed 0's test accuracy over
/// training at the middle M.
pub fn plot(path: &Path, records: &[RunRecord], info: &RunInfo) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1240, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let color = |c: Column| match c {
        Column::Ceiling => BLACK,
        Column::Method(m) => method_color(m),
        Column::VidReference => RGBColor(255, 152, 150),
    };
    let ymin = records
        .iter()
        .filter(|r| r.phase == Phase::Main)
        .map(|r| 100.0 * r.outcome.accuracy())
        .fold(f64::INFINITY, f64::min);
    let ymin = (((ymin - 3.0) / 10.0).floor() * 10.0).clamp(0.0, 90.0);
    let mut chart = accuracy_axes(
        &panels[0],
        "ResNet teacher -> ResNet student",
        &info.samples,
        ymin,
    )?;
    for &c in &info.columns {
        let pts: Vec<(f64, f64, f64)> = info
            .samples
            .iter()
            .filter_map(|&m| {
                let (mu, ci) = mean_ci(&values(&cell(records, c, m, false)))?;
                Some((m as f64, mu, if ci.is_nan() { 0.0 } else { ci }))
            })
            .collect();
        mean_ci_series(&mut chart, &pts, color(c), c.to_string())?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 13)?;

    let mid = info.samples[info.samples.len() / 2];
    let runs: Vec<&RunRecord> = records
        .iter()
        .filter(|r| {
            r.phase == Phase::Main && r.seed == 0 && r.m == mid && r.outcome.student().is_some()
        })
        .collect();
    let steps = info.sched.steps as f64;
    let mut chart = ChartBuilder::on(&panels[1])
        .caption(
            format!("seed 0, M = {mid}: over training"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..steps, ymin..100.0)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("test accuracy (%)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for r in runs {
        let col = color(r.column);
        let curve = &r.outcome.student().map_or(&[][..], |o| &o.curve[..]);
        chart
            .draw_series(LineSeries::new(
                curve
                    .iter()
                    .map(|p| (p.step as f64, 100.0 * p.eval_accuracy)),
                col.stroke_width(2),
            ))?
            .label(r.column.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 13)?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: u64 = 5;
    const SETTING: VidSetting = VidSetting {
        init_variance: 0.1,
        variance_lr: 0.05,
    };

    fn record(phase: Phase, column: Column, m: i64, seed: u64, accuracy: f64) -> RunRecord {
        let outcome = match column {
            Column::Ceiling => Outcome::Ceiling(accuracy),
            _ => Outcome::Student(RunOutcome {
                accuracy,
                best_accuracy: accuracy,
                curve: Vec::new(),
                probe_r2: Vec::new(),
                final_variance: Vec::new(),
            }),
        };
        RunRecord {
            phase,
            column,
            vid: SETTING,
            m,
            seed,
            outcome,
            seconds: 0.0,
        }
    }

    /// Seeds 0..5 at M = 2 and 7: the student at 70% plus a seed-dependent wobble, the
    /// others at a fixed offset from it (points), plus a smaller wobble of their own.
    fn records(ceiling: f64, fitnet: f64, at: f64, vid: f64) -> Vec<RunRecord> {
        let mut out = Vec::new();
        for m in [2, 7] {
            for seed in 0..SEEDS {
                let base = 0.70 + 0.02 * ((seed * 7 % 5) as f64 - 2.0);
                let wobble = 0.002 * ((seed * 3 % 5) as f64 - 2.0);
                let column = |c, points: f64| {
                    record(Phase::Main, c, m, seed, base + points / 100.0 + wobble)
                };
                out.push(record(
                    Phase::Main,
                    Column::Method(Method::Student),
                    m,
                    seed,
                    base,
                ));
                out.push(column(Column::Ceiling, ceiling));
                out.push(column(Column::Method(Method::FitNet), fitnet));
                out.push(column(Column::Method(Method::At), at));
                out.push(column(Column::Method(Method::Vid), vid));
            }
        }
        out
    }

    fn info() -> RunInfo {
        RunInfo {
            teacher_accuracy: 0.99,
            teacher_epochs: 10,
            teacher_seconds: 1.0,
            seeds: SEEDS,
            samples: vec![2, 7],
            columns: vec![
                Column::Ceiling,
                Column::Method(Method::Student),
                Column::Method(Method::FitNet),
                Column::Method(Method::At),
                Column::Method(Method::Vid),
            ],
            quick: false,
            device: "Cpu".into(),
            jobs: 1,
            sched: Schedule {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
                batch: 64,
                steps: 400,
            },
            weights: Weights {
                temperature: 4.0,
                fitnet: 100.0,
                at: 1000.0,
                nst: 50.0,
                vid_lambda: 1.0,
            },
            selection_samples: vec![2, 7],
            selection_seeds: 1,
            fixed: Some(SETTING),
            chosen: SETTING,
            reference: SETTING,
            wall_seconds: 1.0,
        }
    }

    #[test]
    fn the_decision_rule_reads_the_paired_gains() {
        let reading = |c, f, a, v| verdict(&records(c, f, a, v), &info());
        assert!(reading(20.0, 8.0, 0.0, 0.5).contains("VID is at fault"));
        assert!(reading(20.0, 0.0, 5.0, 1.0).contains("VID is at fault"));
        assert!(reading(20.0, 8.0, 0.0, 6.0).contains("VID-I transfers here"));
        assert!(reading(20.0, 1.0, -1.0, 2.9).contains("still lacks the premise"));
        assert!(reading(2.0, 8.0, 0.0, 6.0).contains("lacks the premise, and says nothing"));
    }

    #[test]
    fn a_gain_needs_three_points_and_an_interval_above_zero() {
        let rs = records(20.0, 3.5, 2.9, 0.0);
        assert!(gains(&rs, Column::Method(Method::FitNet), 7));
        assert!(!gains(&rs, Column::Method(Method::At), 7));
        // A large mean with a wide interval is no gain: two seeds far apart.
        let mut wide = records(20.0, 0.0, 0.0, 0.0);
        for r in wide
            .iter_mut()
            .filter(|r| r.column == Column::Method(Method::Vid) && r.m == 7)
        {
            let swing = if r.seed % 2 == 0 { 0.30 } else { -0.15 };
            r.outcome = Outcome::Student(RunOutcome {
                accuracy: r.outcome.accuracy() + swing,
                best_accuracy: 0.0,
                curve: Vec::new(),
                probe_r2: Vec::new(),
                final_variance: Vec::new(),
            });
        }
        let (mean, ci, n) = gain(&wide, Column::Method(Method::Vid), 7).unwrap();
        assert_eq!(n, SEEDS as usize);
        assert!(mean >= 3.0 && mean - ci <= 0.0, "{mean} ± {ci}");
        assert!(!gains(&wide, Column::Method(Method::Vid), 7));
    }

    #[test]
    fn the_choice_takes_the_best_mean_validation_accuracy() {
        let other = VidSetting {
            init_variance: 5.0,
            variance_lr: 0.5,
        };
        let mut rs = Vec::new();
        for (m, a, b) in [(2, 0.50, 0.60), (7, 0.80, 0.75)] {
            rs.push(RunRecord {
                vid: SETTING,
                ..record(Phase::Selection, Column::Method(Method::Vid), m, 100, a)
            });
            rs.push(RunRecord {
                vid: other,
                ..record(Phase::Selection, Column::Method(Method::Vid), m, 100, b)
            });
        }
        assert_eq!(chosen_setting(&rs), Some(other));
        assert_eq!(chosen_setting(&rs[..0]), None);
    }
}
