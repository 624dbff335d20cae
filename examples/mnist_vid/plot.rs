//! The PNGs: test accuracy against training images per class (one panel per student), and
//! the VID variance over training with its final fit to the residual error. Text uses a
//! font compiled into the binary (no system fonts needed).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::chart::{accuracy_axes, legend, mean_ci_series, method_color, register_font, PALETTE};
use crate::models::StudentKind;
use crate::report::{main_cell, RunRecord};
use crate::stats::mean_ci;
use crate::transfer::Method;

fn title(kind: StudentKind) -> &'static str {
    match kind {
        StudentKind::Cnn => "CNN teacher -> CNN student",
        StudentKind::Mlp => "CNN teacher -> MLP student",
    }
}

/// Mean test accuracy with its 95% confidence interval, per method, against M (log scale).
pub fn accuracy(
    path: &Path,
    records: &[RunRecord],
    students: &[StudentKind],
    methods: &[Method],
    samples: &[i64],
    teacher_acc: f64,
) -> anyhow::Result<()> {
    register_font()?;
    let width = 620 * students.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, students.len().max(1)));
    let lo = *samples.iter().min().unwrap_or(&1) as f64;
    let hi = *samples.iter().max().unwrap_or(&350) as f64;
    let ymin = records
        .iter()
        .map(|r| 100.0 * r.accuracy)
        .fold(f64::INFINITY, f64::min);
    let ymin = (((ymin - 3.0) / 5.0).floor() * 5.0).max(0.0);
    for (panel, &kind) in panels.iter().zip(students) {
        let mut chart = accuracy_axes(panel, title(kind), samples, ymin)?;
        let t = 100.0 * teacher_acc;
        chart
            .draw_series(LineSeries::new(
                [(lo * 0.8, t), (hi * 1.25, t)],
                BLACK.mix(0.4).stroke_width(1),
            ))?
            .label(format!("teacher ({t:.1}%)"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
        for &method in methods.iter().filter(|m| m.applies_to(kind)) {
            let c = method_color(method);
            let mut pts: Vec<(f64, f64, f64)> = samples
                .iter()
                .filter_map(|&m| {
                    let accs: Vec<f64> = main_cell(records, kind, method, m)
                        .iter()
                        .map(|&(_, a)| a)
                        .collect();
                    mean_ci(&accs)
                        .map(|(mu, ci)| (m as f64, mu, if ci.is_nan() { 0.0 } else { ci }))
                })
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            mean_ci_series(&mut chart, &pts, c, method.to_string())?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight, 14)?;
    }
    root.present()?;
    Ok(())
}

/// Per student (rows): the mean variance of each layer pair over training steps, one line
/// per M (columns 1-2), and each channel's final variance against its residual error on the
/// training subset, log-log with the line where they meet (column 3).
pub fn variance(
    path: &Path,
    records: &[RunRecord],
    students: &[StudentKind],
) -> anyhow::Result<()> {
    register_font()?;
    let kinds: Vec<StudentKind> = students
        .iter()
        .copied()
        .filter(|&k| {
            records
                .iter()
                .any(|r| r.spec.kind == k && !r.traces.is_empty())
        })
        .collect();
    let root =
        BitMapBackend::new(path, (1500, 440 * kinds.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let rows = root.split_evenly((kinds.len().max(1), 1));
    for (row, &kind) in rows.iter().zip(&kinds) {
        let mut traced: Vec<&RunRecord> = records
            .iter()
            .filter(|r| r.spec.kind == kind && !r.traces.is_empty())
            .collect();
        traced.sort_by_key(|r| std::cmp::Reverse(r.samples_per_class));
        let cells = row.split_evenly((1, 3));
        for (layer, cell) in cells.iter().take(2).enumerate() {
            dynamics_panel(cell, kind, layer, &traced)?;
        }
        fit_panel(&cells[2], kind, &traced)?;
    }
    root.present()?;
    Ok(())
}

fn m_color(i: usize) -> RGBColor {
    [PALETTE[1], PALETTE[2], PALETTE[7], PALETTE[5]][i % 4]
}

fn dynamics_panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    kind: StudentKind,
    layer: usize,
    traced: &[&RunRecord],
) -> anyhow::Result<()> {
    let series: Vec<(i64, &[(usize, f64)])> = traced
        .iter()
        .filter_map(|r| {
            r.traces
                .get(layer)
                .map(|t| (r.samples_per_class, &t.mean_over_steps[..]))
        })
        .collect();
    let xmax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|&(x, _)| x))
        .max()
        .unwrap_or(1) as f64;
    let ymax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|&(_, y)| y))
        .fold(0.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{kind}: block {} pair, mean variance", layer + 1),
            ("sans-serif", 19),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax.max(1e-3))?;
    chart
        .configure_mesh()
        .x_desc("training step (seed 0)")
        .y_desc("mean per-channel variance")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (i, (m, s)) in series.iter().enumerate() {
        let c = m_color(i);
        chart
            .draw_series(LineSeries::new(
                s.iter().map(|&(x, y)| (x as f64, y)),
                c.stroke_width(2),
            ))?
            .label(format!("M = {m}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight, 14)?;
    Ok(())
}

fn fit_panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    kind: StudentKind,
    traced: &[&RunRecord],
) -> anyhow::Result<()> {
    let all = || {
        traced
            .iter()
            .flat_map(|r| r.traces.iter())
            .flat_map(|t| t.variance.iter().chain(&t.residual_train))
            .copied()
            .filter(|v| *v > 0.0)
    };
    let lo = all().fold(f64::INFINITY, f64::min).max(1e-6) * 0.7;
    let hi = all().fold(0.0, f64::max).max(lo * 10.0) * 1.4;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{kind}: final variance vs residual, per channel"),
            ("sans-serif", 19),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("mean squared residual on the training subset")
        .y_desc("learnt variance")
        .x_label_formatter(&|x| format!("{x:.2e}"))
        .y_label_formatter(&|y| format!("{y:.2e}"))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    chart
        .draw_series(LineSeries::new([(lo, lo), (hi, hi)], BLACK.mix(0.5)))?
        .label("variance = residual")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (i, r) in traced.iter().enumerate() {
        let c = m_color(i);
        for (layer, t) in r.traces.iter().enumerate() {
            let pts = t
                .residual_train
                .iter()
                .zip(&t.variance)
                .map(|(&e, &v)| (e, v));
            if layer == 0 {
                chart.draw_series(pts.map(|p| Circle::new(p, 3, c.filled())))?;
            } else {
                chart.draw_series(pts.map(|p| TriangleMarker::new(p, 4, c.filled())))?;
            }
        }
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label(format!(
                "M = {} (o block 1, ^ block 2)",
                r.samples_per_class
            ))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 13)?;
    Ok(())
}
