//! The CSV of every run and the Markdown table of means and spreads.

use std::fmt::Write as _;
use std::path::Path;

use crate::data::POOL_PER_CLASS;
use crate::models::{Method, StudentKind, TrainSettings};

pub struct RunResult {
    pub student: StudentKind,
    pub method: Method,
    pub samples_per_class: i64,
    pub seed: u64,
    pub test_accuracy: f64,
    pub vid_variance: Option<f64>,
    pub seconds: f64,
}

pub struct RunInfo {
    pub teacher_accuracy: f64,
    pub teacher_epochs: usize,
    pub steps: usize,
    pub seeds: u64,
    pub quick: bool,
    pub threads: i32,
    pub settings: TrainSettings,
    pub wall_seconds: f64,
}

pub fn write_csv(path: &Path, results: &[RunResult]) -> anyhow::Result<()> {
    let mut s = String::from(
        "student,method,samples_per_class,seed,test_accuracy_pct,final_vid_variance_mean,seconds\n",
    );
    for r in results {
        writeln!(
            s,
            "{},{},{},{},{:.2},{},{:.2}",
            r.student,
            r.method,
            r.samples_per_class,
            r.seed,
            100.0 * r.test_accuracy,
            r.vid_variance
                .map(|v| format!("{v:.4}"))
                .unwrap_or_default(),
            r.seconds
        )?;
    }
    std::fs::write(path, s)?;
    Ok(())
}

/// Mean and sample standard deviation (0 for one value), in percent.
pub fn mean_std(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some((100.0 * m, 100.0 * var.sqrt()))
}

pub fn cell(
    results: &[RunResult],
    student: StudentKind,
    method: Method,
    m: i64,
) -> impl Iterator<Item = &RunResult> {
    results
        .iter()
        .filter(move |r| r.student == student && r.method == method && r.samples_per_class == m)
}

pub fn markdown(
    results: &[RunResult],
    students: &[StudentKind],
    methods: &[Method],
    samples: &[i64],
    info: &RunInfo,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Test accuracy (%) on 1,000 held-out MNIST digits, mean ± sample std over {} seed{} \
         (each seed draws its own training subset). Teacher (CNN, 4,000 images, {} epochs): {:.2}%.{}\n",
        info.seeds,
        if info.seeds == 1 { "" } else { "s" },
        info.teacher_epochs,
        100.0 * info.teacher_accuracy,
        if info.quick { " **Quick mode: a demonstration, not the experiment.**" } else { "" }
    );
    for &student in students {
        let title = match student {
            StudentKind::Cnn => "CNN student (CNN teacher -> smaller CNN)",
            StudentKind::Mlp => "MLP student (CNN teacher -> MLP, heterogeneous)",
        };
        let _ = writeln!(s, "**{title}**\n");
        let _ = write!(s, "| M (per class) |");
        for m in methods {
            let _ = write!(s, " {m} |");
        }
        let _ = write!(s, "\n|---|");
        for _ in methods {
            let _ = write!(s, "---|");
        }
        s.push('\n');
        for &m in samples {
            let stats: Vec<Option<(f64, f64)>> = methods
                .iter()
                .map(|&method| {
                    let accs: Vec<f64> = cell(results, student, method, m)
                        .map(|r| r.test_accuracy)
                        .collect();
                    mean_std(&accs)
                })
                .collect();
            let best = stats
                .iter()
                .flatten()
                .map(|&(mu, _)| mu)
                .fold(f64::NEG_INFINITY, f64::max);
            let pct = 100.0 * m as f64 / POOL_PER_CLASS as f64;
            let _ = write!(s, "| {m} ({pct}%) |");
            for st in &stats {
                match st {
                    Some((mu, sd)) if (*mu - best).abs() < 1e-9 => {
                        let _ = write!(s, " **{mu:.2} ± {sd:.2}** |");
                    }
                    Some((mu, sd)) => {
                        let _ = write!(s, " {mu:.2} ± {sd:.2} |");
                    }
                    None => s.push_str(" n/a |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }
    // the learnt VID variance, for the reading of the results
    let mut any = false;
    let mut v =
        String::from("Mean per-channel VID variance at the end of training (initial value ");
    let _ = write!(v, "{}):", info.settings.vid_init_variance);
    for &student in students {
        for &m in samples {
            let vars: Vec<f64> = cell(results, student, Method::Vid, m)
                .filter_map(|r| r.vid_variance)
                .collect();
            if !vars.is_empty() {
                any = true;
                let _ = write!(
                    v,
                    " {student} M={m}: {:.3};",
                    vars.iter().sum::<f64>() / vars.len() as f64
                );
            }
        }
    }
    if any {
        v.pop();
        let _ = writeln!(s, "{v}.\n");
    }
    let st = &info.settings;
    let _ = writeln!(
        s,
        "Settings: {} Adam steps (lr {}, batch {}) per student; KD T = {}, 0.1 CE + 0.9 KD; \
         FitNet weight {}; AT weight {}; VID lambda {}, initial variance {}, \
         variance learning rate {}. {} libtorch threads; wall time {:.1} s.",
        info.steps,
        st.lr,
        st.batch,
        st.temperature,
        st.fitnet_weight,
        st.at_weight,
        st.vid_lambda,
        st.vid_init_variance,
        st.vid_lr.unwrap_or(st.lr),
        info.threads,
        info.wall_seconds
    );
    s
}
