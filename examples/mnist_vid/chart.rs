//! Plot helpers shared by the MNIST experiments: colours, the bundled font, legends.

use plotters::coord::combinators::{LogCoord, WithKeyPoints};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::transfer::Method;

/// One colour per method, in `Method::ALL` order.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(80, 80, 80),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(214, 39, 40),
    RGBColor(23, 190, 207),
    RGBColor(255, 127, 14),
];

pub fn method_color(m: Method) -> RGBColor {
    PALETTE[Method::ALL.iter().position(|&x| x == m).unwrap_or(0)]
}

pub fn register_font() -> anyhow::Result<()> {
    // The bundled font under the family name plotters asks for.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    )
    .map_err(|_| anyhow::anyhow!("the bundled font could not be parsed"))
}

/// The series legend, boxed, at `position`.
pub fn legend<'a, 'b: 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
    font_size: u32,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", font_size))
        .draw()?;
    Ok(())
}

/// The axes of test accuracy against training images per class `samples` (log scale, a
/// tick at each M), from `ymin` to 100%.
pub fn accuracy_axes<'a, 'b>(
    panel: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    caption: &str,
    samples: &[i64],
    ymin: f64,
) -> anyhow::Result<AccuracyChart<'a, 'b>> {
    let lo = *samples.iter().min().unwrap_or(&1) as f64;
    let hi = *samples.iter().max().unwrap_or(&350) as f64;
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(52)
        .build_cartesian_2d(
            (lo * 0.8..hi * 1.25)
                .log_scale()
                .with_key_points(samples.iter().map(|&m| m as f64).collect()),
            ymin..100.0,
        )?;
    chart
        .configure_mesh()
        .x_desc("training images per class (log scale)")
        .y_desc("test accuracy (%), mean and 95% CI")
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    Ok(chart)
}

/// What `accuracy_axes` draws on.
pub type AccuracyChart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<WithKeyPoints<LogCoord<f64>>, RangedCoordf64>>;

/// One labelled series of (M, mean, 95% CI half-width) points: a line, error bars and dots.
pub fn mean_ci_series(
    chart: &mut AccuracyChart<'_, '_>,
    points: &[(f64, f64, f64)],
    color: RGBColor,
    label: String,
) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|&(x, y, _)| (x, y)),
            color.stroke_width(2),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y, ci)| ErrorBar::new_vertical(x, y - ci, y, y + ci, color.filled(), 6)),
    )?;
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y, _)| Circle::new((x, y), 3, color.filled())),
    )?;
    Ok(())
}
