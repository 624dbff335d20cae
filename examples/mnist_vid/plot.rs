//! The PNG: test accuracy against training images per class, one line per method, one
//! panel per student. Text uses a font compiled into the binary (no system fonts needed).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::models::{Method, StudentKind};
use crate::report::{cell, mean_std, RunResult};

const COLORS: [RGBColor; 6] = [
    RGBColor(80, 80, 80),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
];

fn color(m: Method) -> RGBColor {
    COLORS[match m {
        Method::Student => 0,
        Method::Kd => 1,
        Method::FitNet => 2,
        Method::At => 3,
        Method::Vid => 4,
        Method::KdVid => 5,
    }]
}

pub fn plot(
    path: &Path,
    results: &[RunResult],
    students: &[StudentKind],
    methods: &[Method],
    samples: &[i64],
    teacher_acc: f64,
) -> anyhow::Result<()> {
    // Register the bundled font under the family name plotters asks for.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    )
    .map_err(|_| anyhow::anyhow!("the bundled font could not be parsed"))?;
    let width = 620 * students.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, students.len().max(1)));
    let (lo, hi) = (
        *samples.iter().min().unwrap_or(&1) as f64,
        *samples.iter().max().unwrap_or(&400) as f64,
    );
    // y range from the data, with room
    let mut ymin = f64::INFINITY;
    for r in results {
        ymin = ymin.min(100.0 * r.test_accuracy);
    }
    let ymin = ((ymin - 3.0) / 5.0).floor() * 5.0;
    let ymax = 100.0;
    for (panel, &student) in panels.iter().zip(students) {
        let title = match student {
            StudentKind::Cnn => "CNN teacher -> CNN student",
            StudentKind::Mlp => "CNN teacher -> MLP student",
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(52)
            .build_cartesian_2d(
                (lo * 0.8..hi * 1.25)
                    .log_scale()
                    .with_key_points(samples.iter().map(|&m| m as f64).collect()),
                ymin.max(0.0)..ymax,
            )?;
        chart
            .configure_mesh()
            .x_desc("training images per class (log scale)")
            .y_desc("test accuracy (%)")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                [
                    (lo * 0.8, 100.0 * teacher_acc),
                    (hi * 1.25, 100.0 * teacher_acc),
                ],
                BLACK.mix(0.4).stroke_width(1),
            ))?
            .label(format!("teacher ({:.1}%)", 100.0 * teacher_acc))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
        for &method in methods.iter().filter(|m| m.applies_to(student)) {
            let c = color(method);
            let pts: Vec<(f64, f64, f64)> = samples
                .iter()
                .filter_map(|&m| {
                    let accs: Vec<f64> = cell(results, student, method, m)
                        .map(|r| r.test_accuracy)
                        .collect();
                    mean_std(&accs).map(|(mu, sd)| (m as f64, mu, sd))
                })
                .collect();
            let mut sorted = pts.clone();
            sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(
                    sorted.iter().map(|&(x, y, _)| (x, y)),
                    c.stroke_width(2),
                ))?
                .label(method.to_string())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(
                sorted
                    .iter()
                    .map(|&(x, y, sd)| ErrorBar::new_vertical(x, y - sd, y, y + sd, c.filled(), 6)),
            )?;
            chart.draw_series(
                sorted
                    .iter()
                    .map(|&(x, y, _)| Circle::new((x, y), 3, c.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
