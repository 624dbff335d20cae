//! The size sweep shared by the CPU and GPU benches: the shapes, the CSV rows, and the plot
//! (time and effective bandwidth against the element count, log-log, one line per
//! implementation).

// Each bench that includes this module uses a part of it.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// The sweep's shapes: f32 NCHW maps with 64 channels, from 640 to 2^24 (16.7M) elements,
/// about 4x apart.
pub const SHAPES: [[i64; 4]; 9] = [
    [10, 64, 1, 1],
    [2, 64, 4, 4],
    [8, 64, 4, 4],
    [8, 64, 8, 8],
    [8, 64, 16, 16],
    [32, 64, 16, 16],
    [32, 64, 32, 32],
    [128, 64, 32, 32],
    [64, 64, 64, 64],
];

/// Tensor passes a forward+backward must make: forward reads `mean` and `target`, backward
/// reads both and writes the gradient of `mean`. Effective bandwidth = 5 x bytes / time.
pub const PASSES: f64 = 5.0;

/// The sweep's shapes with at most `max_elems` elements.
pub fn shapes(max_elems: i64) -> Vec<[i64; 4]> {
    SHAPES
        .iter()
        .copied()
        .filter(|s| s.iter().product::<i64>() <= max_elems)
        .collect()
}

/// `10x64x1x1`.
pub fn shape_name(shape: &[i64]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// One measured point: median milliseconds per forward+backward of `implementation`.
#[derive(Debug, Clone)]
pub struct Row {
    /// `cpu` or `cuda`.
    pub device: String,
    /// `fused`, `plain_tch`, `torch_eager`, `torch_compile`, or `bytes_floor` (5 passes at the
    /// measured copy bandwidth).
    pub implementation: String,
    /// `float32`.
    pub dtype: String,
    /// `NxCxHxW`.
    pub shape: String,
    /// Elements of `mean`.
    pub elems: i64,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Timed calls the median is taken over (0 for the floor).
    pub calls: usize,
    /// Intra-op threads (CPU), 0 on a GPU.
    pub threads: i64,
}

impl Row {
    /// Effective bandwidth in GB/s: 5 passes over 4-byte elements.
    pub fn gb_s(&self) -> f64 {
        PASSES * self.elems as f64 * 4.0 / (self.ms * 1e-3) / 1e9
    }
}

pub const HEADER: &str = "device,implementation,dtype,shape,elems,ms,gb_s,calls,threads";

pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from(HEADER);
    s.push('\n');
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{:.6},{:.3},{},{}",
            r.device,
            r.implementation,
            r.dtype,
            r.shape,
            r.elems,
            r.ms,
            r.gb_s(),
            r.calls,
            r.threads
        );
    }
    s
}

pub fn read_csv(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    anyhow::ensure!(
        header == HEADER,
        "{}: expected the header {HEADER:?}, got {header:?}",
        path.display()
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            anyhow::ensure!(f.len() == 9, "{}: bad row {l:?}", path.display());
            Ok(Row {
                device: f[0].into(),
                implementation: f[1].into(),
                dtype: f[2].into(),
                shape: f[3].into(),
                elems: f[4].parse()?,
                ms: f[5].parse()?,
                calls: f[7].parse()?,
                threads: f[8].parse()?,
            })
        })
        .collect()
}

/// Median milliseconds per call of `f` (after 3 warm-up calls), over at least 5 calls and
/// until `budget_ms` of timed calls have passed. `sync` runs after each call before the
/// clock stops (a device synchronisation on a GPU).
pub fn median_ms(budget_ms: f64, mut f: impl FnMut(), sync: impl Fn()) -> (f64, usize) {
    for _ in 0..3 {
        f();
    }
    sync();
    let mut times = Vec::new();
    let mut total = 0.0;
    while times.len() < 5 || (total < budget_ms && times.len() < 100_000) {
        let t0 = std::time::Instant::now();
        f();
        sync();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        total += ms;
        times.push(ms);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times.len())
}

const SERIES: [(&str, &str, RGBColor); 5] = [
    ("fused", "vidfuse (fused)", RGBColor(214, 39, 40)),
    ("plain_tch", "plain tch ops", RGBColor(31, 119, 180)),
    ("torch_eager", "PyTorch eager", RGBColor(44, 160, 44)),
    ("torch_compile", "torch.compile", RGBColor(255, 127, 14)),
    (
        "bytes_floor",
        "bytes floor (copy bandwidth)",
        RGBColor(90, 90, 90),
    ),
];

/// Two panels, log-log: milliseconds per forward+backward, and effective GB/s, against the
/// element count; one line per implementation present in `rows`.
pub fn plot(path: &Path, rows: &[Row], title: &str) -> anyhow::Result<()> {
    anyhow::ensure!(!rows.is_empty(), "nothing to plot");
    // Register the bundled font under the family name plotters asks for (no system fonts).
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    )
    .map_err(|_| anyhow::anyhow!("the bundled font could not be parsed"))?;
    let root = BitMapBackend::new(path, (1300, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(40);
    top.titled(title, ("sans-serif", 22))?;
    let panels = body.split_evenly((1, 2));
    let lo = rows.iter().map(|r| r.elems).min().unwrap_or(1) as f64;
    let hi = rows.iter().map(|r| r.elems).max().unwrap_or(2) as f64;
    let x_range = (lo / 1.5)..(hi * 1.5);
    // Ticks at powers of ten (the default ticks of a log axis crowd).
    let decades = |lo: f64, hi: f64| -> Vec<f64> {
        let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (a..=b)
            .map(|e| 10f64.powi(e))
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    type Metric = (&'static str, fn(&Row) -> f64);
    let metrics: [Metric; 2] = [
        ("ms per forward+backward", |r| r.ms),
        ("effective GB/s (5 passes x bytes / time)", |r| r.gb_s()),
    ];
    for (panel, (label, value)) in panels.iter().zip(metrics) {
        let vals: Vec<f64> = rows
            .iter()
            .map(value)
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let ymin = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let ymax = vals.iter().cloned().fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(
                x_range
                    .clone()
                    .log_scale()
                    .with_key_points(decades(x_range.start, x_range.end)),
                ((ymin / 2.0)..(ymax * 2.0))
                    .log_scale()
                    .with_key_points(decades(ymin / 2.0, ymax * 2.0)),
            )?;
        chart
            .configure_mesh()
            .x_desc("elements (f32)")
            .y_desc(label)
            .x_label_formatter(&|v| format_count(*v))
            .y_label_formatter(&|v| format_value(*v))
            .label_style(("sans-serif", 14))
            .draw()?;
        for (key, name, color) in SERIES {
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.implementation == key)
                .map(|r| (r.elems as f64, value(r)))
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            if pts.is_empty() {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let style = ShapeStyle::from(&color).stroke_width(2);
            chart
                .draw_series(LineSeries::new(pts.clone(), style))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn format_value(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn format_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
