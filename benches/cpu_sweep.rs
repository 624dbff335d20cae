//! CPU size sweep of forward+backward, 640 to 16.7M f32 elements: the fused op against the
//! same loss in plain tch ops, with the bytes floor from the machine's copy bandwidth; and
//! the CSV + PNG writer that merges these rows with the PyTorch peers' (eager,
//! torch.compile; `scripts/vid_sweep_peers.py`). `scripts/bench-sweep.sh` runs everything.
//!
//! ```text
//! cargo bench --features bench --bench cpu_sweep -- shapes [--max-elems N]          # the shapes, one a line
//! cargo bench --features bench --bench cpu_sweep -- measure --csv OUT [--max-elems N] [--budget-ms MS]
//! cargo bench --features bench --bench cpu_sweep -- plot --csv OUT --png OUT [--title T] IN.csv...
//! ```
//!
//! Gradients are returned (`run_backward`), not accumulated into `.grad`; the peers script
//! does the same with `torch.autograd.grad`.

#[path = "sweep/mod.rs"]
mod sweep;

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use vidfuse::{vid_loss, VidOptions};

use sweep::Row;

/// The same loss in plain tch ops (what a tch user writes without vidfuse).
fn plain_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor) -> Tensor {
    let c = log_scale.size()[0];
    let var = (log_scale.softplus() + 1e-5).view([1, c, 1, 1]);
    (((mean - target).square() / &var + var.log()) * 0.5).mean(None)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn measure(args: &[String]) -> anyhow::Result<()> {
    let csv = PathBuf::from(arg(args, "--csv").ok_or_else(|| anyhow::anyhow!("--csv OUT"))?);
    let max_elems: i64 = arg(args, "--max-elems").map_or(Ok(1 << 24), |s| s.parse())?;
    let budget_ms: f64 = arg(args, "--budget-ms").map_or(Ok(1000.0), |s| s.parse())?;
    let threads = tch::get_num_threads() as i64;
    let opts = (Kind::Float, Device::Cpu);
    let row = |implementation: &str, shape: &[i64], ms: f64, calls: usize| Row {
        device: "cpu".into(),
        implementation: implementation.into(),
        dtype: "float32".into(),
        shape: sweep::shape_name(shape),
        elems: shape.iter().product(),
        ms,
        calls,
        threads,
    };

    // The copy bandwidth (bytes read + written per second) of 2^24 f32 values.
    let n = 1i64 << 24;
    let src = Tensor::rand([n], opts);
    let mut dst = src.empty_like();
    let (copy_ms, _) = sweep::median_ms(budget_ms, || dst.copy_(&src), || ());
    let bandwidth = 2.0 * 4.0 * n as f64 / (copy_ms * 1e-3);
    eprintln!(
        "copy bandwidth {:.1} GB/s, {threads} threads",
        bandwidth / 1e9
    );
    drop((src, dst));

    let mut rows = Vec::new();
    let opts_vid = VidOptions::default();
    for shape in sweep::shapes(max_elems) {
        tch::manual_seed(0);
        let mean = Tensor::randn(shape, opts).set_requires_grad(true);
        let target = Tensor::randn(shape, opts);
        let log_scale = Tensor::full([shape[1]], 1.0, opts).set_requires_grad(true);
        let (m, t, a) = (&mean, &target, &log_scale);
        let (fused, fused_calls) = sweep::median_ms(
            budget_ms,
            || {
                drop(Tensor::run_backward(
                    &[vid_loss(m, t, a, &opts_vid)],
                    &[m, a],
                    false,
                    false,
                ))
            },
            || (),
        );
        let (plain, plain_calls) = sweep::median_ms(
            budget_ms,
            || {
                drop(Tensor::run_backward(
                    &[plain_loss(m, t, a)],
                    &[m, a],
                    false,
                    false,
                ))
            },
            || (),
        );
        let elems: i64 = shape.iter().product();
        let floor = sweep::PASSES * elems as f64 * 4.0 / bandwidth * 1e3;
        eprintln!(
            "{:>14}: fused {fused:9.4} ms, plain tch {plain:9.4} ms, floor {floor:9.4} ms",
            sweep::shape_name(&shape)
        );
        rows.push(row("fused", &shape, fused, fused_calls));
        rows.push(row("plain_tch", &shape, plain, plain_calls));
        rows.push(row("bytes_floor", &shape, floor, 0));
    }
    std::fs::write(&csv, sweep::to_csv(&rows))?;
    eprintln!("wrote {}", csv.display());
    Ok(())
}

fn plot(args: &[String]) -> anyhow::Result<()> {
    let csv = PathBuf::from(arg(args, "--csv").ok_or_else(|| anyhow::anyhow!("--csv OUT"))?);
    let png = PathBuf::from(arg(args, "--png").ok_or_else(|| anyhow::anyhow!("--png OUT"))?);
    let title = arg(args, "--title").unwrap_or_else(|| "VID loss, forward+backward".into());
    let mut inputs = Vec::new();
    let mut skip = false;
    for a in &args[1..] {
        if skip {
            skip = false;
        } else if matches!(a.as_str(), "--csv" | "--png" | "--title") {
            skip = true;
        } else if !a.starts_with("--") {
            inputs.push(PathBuf::from(a));
        }
    }
    anyhow::ensure!(!inputs.is_empty(), "no input CSV");
    let mut rows = Vec::new();
    for input in &inputs {
        rows.extend(sweep::read_csv(input)?);
    }
    std::fs::write(&csv, sweep::to_csv(&rows))?;
    sweep::plot(&png, &rows, &title)?;
    eprintln!("wrote {} and {}", csv.display(), png.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` adds `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("shapes") => {
            let max_elems: i64 = arg(&args, "--max-elems").map_or(Ok(1 << 24), |s| s.parse())?;
            for shape in sweep::shapes(max_elems) {
                println!("{}", sweep::shape_name(&shape));
            }
            Ok(())
        }
        Some("measure") => measure(&args),
        Some("plot") => plot(&args),
        // A plain `cargo bench` runs every bench: this one does nothing unless asked.
        _ => {
            eprintln!("cpu_sweep: run scripts/bench-sweep.sh (or: shapes | measure | plot)");
            Ok(())
        }
    }
}
