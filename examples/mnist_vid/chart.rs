//! Plot helpers shared by the MNIST experiments: colours, the bundled font, legends.

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
pub fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
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
