//! GPU timings of the fused op, with CUDA events on PyTorch's current stream: forward and
//! forward+backward against the same loss in plain tch ops, and against the measured
//! device-copy bandwidth. Prints a table and, with `--csv PATH`, writes a CSV.
//! Without a CUDA device it prints a note and exits. Run: `cargo bench --features bench --bench gpu`.
//!
//! `--sweep-csv PATH` also runs the size sweep of the CPU bench (`benches/cpu_sweep.rs`:
//! f32 NCHW, 640 to 16.7M elements, fused and plain tch forward+backward, and the bytes
//! floor at the device-copy bandwidth) and writes it in the same CSV format; with
//! `--sweep-peers PATH` (the CSV of `scripts/vid_sweep_peers.py --device cuda`) those rows are
//! merged in, and `--sweep-png PATH` plots them as the CPU sweep (`--sweep-title` names it).

#[path = "sweep/mod.rs"]
mod sweep;

use cudarc::driver::{result::event, sys};
use tch::{Device, Kind, Tensor};
use vidfuse::cuda::graph;
use vidfuse::{f_vid_loss, VidOptions};

/// Calls per timed batch, and batches (the median batch is reported).
const CALLS: usize = 10;
const BATCHES: usize = 15;

/// Median milliseconds per call of `f`, timed with CUDA events around batches of calls.
fn time_ms(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let stream = graph::current_stream(0).expect("current stream") as sys::CUstream;
    let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
    let (start, end) = (event::create(flags).unwrap(), event::create(flags).unwrap());
    let mut times = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        // SAFETY: events and stream are live; the context is current (warm_up bound it).
        unsafe { event::record(start, stream) }.unwrap();
        for _ in 0..CALLS {
            f();
        }
        unsafe { event::record(end, stream) }.unwrap();
        graph::synchronize(0).unwrap();
        times.push(unsafe { event::elapsed(start, end) }.unwrap() as f64 / CALLS as f64);
    }
    // SAFETY: the events are not used after this.
    unsafe {
        let _ = event::destroy(start);
        let _ = event::destroy(end);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[BATCHES / 2]
}

/// The loss in plain tch ops (what a tch user writes without vidfuse).
/// Median milliseconds per replay of `f` captured in a CUDA graph: the device time of the
/// kernels alone, without the host work of a call (validation, planning, launches).
fn graph_time_ms(f: impl Fn()) -> f64 {
    graph::with_new_stream(0, || {
        f(); // warm-up outside the capture: allocator blocks, autograd threads
        f();
        let mut g = graph::CudaGraph::new().expect("graph");
        g.capture(|| {
            f();
            Ok(())
        })
        .expect("capture");
        time_ms(|| g.replay().expect("replay"))
    })
    .expect("side stream")
}

fn plain_vid(mean: &Tensor, target: &Tensor, log_scale: &Tensor) -> Tensor {
    let mut view = vec![1i64; mean.dim()];
    view[1] = -1;
    let var = (log_scale.softplus() + 1e-5)
        .view(&view[..])
        .to_kind(mean.kind());
    (((mean - target).square() / &var + var.log()) * 0.5).mean(mean.kind())
}

struct Case {
    shape: Vec<i64>,
    kind: Kind,
    layout: &'static str,
}

fn make(case: &Case, device: Device) -> (Tensor, Tensor, Tensor) {
    let randn = || {
        let t = Tensor::randn(&case.shape[..], (case.kind, device));
        if case.layout == "nhwc" {
            let rank = case.shape.len() as i64;
            let mut order = vec![0i64];
            order.extend(2..rank);
            order.push(1);
            let mut inverse = vec![0i64; rank as usize];
            for (p, &d) in order.iter().enumerate() {
                inverse[d as usize] = p as i64;
            }
            t.permute(&order[..]).contiguous().permute(&inverse[..])
        } else {
            t
        }
    };
    let mean = randn().set_requires_grad(true);
    let target = randn();
    let log_scale =
        Tensor::full([case.shape[1]], 1.0, (Kind::Float, device)).set_requires_grad(true);
    (mean, target, log_scale)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let csv_path = args
        .iter()
        .position(|a| a == "--csv")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let quick = args.iter().any(|a| a == "--quick");
    if args.iter().any(|a| a == "--list-sweep-shapes") {
        for shape in sweep::shapes(1 << 24) {
            println!("{}", sweep::shape_name(&shape));
        }
        return;
    }
    if !tch::Cuda::is_available() {
        println!("SKIPPED: no CUDA device; GPU timings need one (scripts/gpu-run.sh)");
        return;
    }
    let device = Device::Cuda(0);
    vidfuse::cuda::warm_up(device).expect("kernels load");

    let n = 1i64 << 28;
    let a = Tensor::rand([n], (Kind::Float, device));
    let mut b = a.empty_like();
    let copy_ms = time_ms(|| {
        b.copy_(&a);
    });
    let copy_gbs = 2.0 * n as f64 * 4.0 / (copy_ms * 1e-3) / 1e9;
    println!("device-copy bandwidth: {copy_gbs:.0} GB/s ({copy_ms:.3} ms for 2 x 1 GiB)");

    // vid_peers.py's GPU shapes (so rows line up with the peers), plus a 16M-element NCHW
    // map with long rows.
    let shapes: Vec<Vec<i64>> = if quick {
        vec![vec![64, 256, 32, 32]]
    } else {
        vec![
            vec![64, 64, 32, 32],
            vec![256, 256, 16, 16],
            vec![256, 512, 8, 8],
            vec![1024, 128, 32, 32],
            vec![4096, 1000],
            vec![64, 256, 32, 32],
        ]
    };
    let mut cases = Vec::new();
    for shape in &shapes {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let layouts: &[&str] = if shape.len() > 2 {
                &["nchw", "nhwc"]
            } else {
                &["nc"]
            };
            for &layout in layouts {
                cases.push(Case {
                    shape: shape.clone(),
                    kind,
                    layout,
                });
            }
        }
    }

    let header = "shape,dtype,layout,elems,fused_fwd_ms,fused_bwd_ms,fused_fwd_bwd_ms,plain_fwd_ms,plain_fwd_bwd_ms,fwd_copy_pct,bwd_copy_pct,speedup_fwd_bwd,graph_fwd_ms,graph_fwd_bwd_ms,graph_fwd_copy_pct,graph_bwd_copy_pct";
    let mut csv = vec![header.to_string()];
    println!(
        "{:>16} {:>5} {:>4} | {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>7} {:>7} | {:>7}",
        "shape",
        "dtype",
        "lay",
        "fwd ms",
        "bwd ms",
        "f+b ms",
        "tch fwd",
        "tch f+b",
        "fwd %bw",
        "bwd %bw",
        "speedup"
    );
    let opts = VidOptions::default();
    for case in &cases {
        let (mean, target, log_scale) = make(case, device);
        let elems = mean.numel() as f64;
        let esize = case.kind.elt_size_in_bytes() as f64;
        let fwd = time_ms(|| {
            let _loss = tch::no_grad(|| f_vid_loss(&mean, &target, &log_scale, &opts).unwrap());
        });
        let fwd_bwd = time_ms(|| {
            let loss = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
            let _ = Tensor::run_backward(&[&loss], &[&mean, &log_scale], false, false);
        });
        let plain_fwd = time_ms(|| {
            let _loss = tch::no_grad(|| plain_vid(&mean, &target, &log_scale));
        });
        let plain_fwd_bwd = time_ms(|| {
            let loss = plain_vid(&mean, &target, &log_scale);
            let _ = Tensor::run_backward(&[&loss], &[&mean, &log_scale], false, false);
        });
        // The same calls replayed from a CUDA graph: kernel time only.
        let graph_fwd = graph_time_ms(|| {
            let _loss = tch::no_grad(|| f_vid_loss(&mean, &target, &log_scale, &opts).unwrap());
        });
        let graph_fwd_bwd = graph_time_ms(|| {
            let loss = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
            let _ = Tensor::run_backward(&[&loss], &[&mean, &log_scale], false, false);
        });
        let bwd = fwd_bwd - fwd;
        // Minimum bytes: forward reads mean and target; backward reads both, writes d/dmean.
        let pct = |bytes: f64, ms: f64| 100.0 * bytes / (ms * 1e-3) / 1e9 / copy_gbs;
        let (fwd_pct, bwd_pct) = (pct(2.0 * elems * esize, fwd), pct(3.0 * elems * esize, bwd));
        let graph_bwd = graph_fwd_bwd - graph_fwd;
        let (graph_fwd_pct, graph_bwd_pct) = (
            pct(2.0 * elems * esize, graph_fwd),
            pct(3.0 * elems * esize, graph_bwd),
        );
        let shape = case
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let dtype = format!("{:?}", case.kind).to_lowercase();
        println!(
            "{shape:>16} {dtype:>5} {:>4} | {fwd:9.4} {bwd:9.4} {fwd_bwd:9.4} | {plain_fwd:9.4} {plain_fwd_bwd:9.4} | {fwd_pct:6.1}% {bwd_pct:6.1}% | {:6.2}x | graph {graph_fwd_pct:5.1}% {graph_bwd_pct:5.1}%",
            case.layout,
            plain_fwd_bwd / fwd_bwd
        );
        csv.push(format!(
            "{shape},{dtype},{},{},{fwd:.5},{bwd:.5},{fwd_bwd:.5},{plain_fwd:.5},{plain_fwd_bwd:.5},{fwd_pct:.1},{bwd_pct:.1},{:.3},{graph_fwd:.5},{graph_fwd_bwd:.5},{graph_fwd_pct:.1},{graph_bwd_pct:.1}",
            case.layout,
            elems as u64,
            plain_fwd_bwd / fwd_bwd
        ));
    }
    if let Some(path) = csv_path {
        std::fs::write(&path, csv.join("\n") + "\n").expect("write csv");
        println!("wrote {path}");
    }
    pairs4(device);
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(path) = arg("--sweep-csv") {
        let mut rows = size_sweep(device, copy_gbs);
        if let Some(peers) = arg("--sweep-peers") {
            match sweep::read_csv(std::path::Path::new(&peers)) {
                Ok(peer_rows) => rows.extend(peer_rows),
                Err(e) => println!("sweep: without the PyTorch peers: {e}"),
            }
        }
        std::fs::write(&path, sweep::to_csv(&rows)).expect("write sweep csv");
        println!("wrote {path}");
        if let Some(png) = arg("--sweep-png") {
            let title = arg("--sweep-title")
                .unwrap_or_else(|| "VID loss forward+backward, CUDA device 0".into());
            sweep::plot(std::path::Path::new(&png), &rows, &title).expect("plot");
            println!("wrote {png}");
        }
    }
}

/// The size sweep on `device`: fused and plain tch forward+backward (gradients returned, not
/// accumulated), timed with CUDA events, and the bytes floor at `copy_gbs`.
fn size_sweep(device: Device, copy_gbs: f64) -> Vec<sweep::Row> {
    let opts = VidOptions::default();
    let mut rows = Vec::new();
    for shape in sweep::shapes(1 << 24) {
        let case = Case {
            shape: shape.to_vec(),
            kind: Kind::Float,
            layout: "nchw",
        };
        let (mean, target, log_scale) = make(&case, device);
        let fused = time_ms(|| {
            let loss = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
            let _ = Tensor::run_backward(&[&loss], &[&mean, &log_scale], false, false);
        });
        let plain = time_ms(|| {
            let loss = plain_vid(&mean, &target, &log_scale);
            let _ = Tensor::run_backward(&[&loss], &[&mean, &log_scale], false, false);
        });
        let elems: i64 = shape.iter().product();
        let floor = sweep::PASSES * elems as f64 * 4.0 / (copy_gbs * 1e9) * 1e3;
        println!(
            "sweep {:>14}: fused {fused:9.4} ms, plain tch {plain:9.4} ms, floor {floor:9.4} ms",
            sweep::shape_name(&shape)
        );
        for (implementation, ms, calls) in [
            ("fused", fused, CALLS * BATCHES),
            ("plain_tch", plain, CALLS * BATCHES),
            ("bytes_floor", floor, 0),
        ] {
            rows.push(sweep::Row {
                device: "cuda".into(),
                implementation: implementation.into(),
                dtype: "float32".into(),
                shape: sweep::shape_name(&shape),
                elems,
                ms,
                calls,
                threads: 0,
            });
        }
    }
    rows
}

/// Four layer pairs of [128, 64, 8, 8] (the grouped-op case), forward + backward per step:
/// one grouped call, four single calls, the same loss in plain tch ops, and the grouped step
/// replayed from a CUDA graph. Kernel launches per step: grouped 4 (2 forward, 2 backward),
/// single 16 and up.
fn pairs4(device: Device) {
    use vidfuse::{f_vid_loss_grouped, VidTerm};
    println!("4 pairs of [128, 64, 8, 8], forward + backward per step (ms):");
    let opts = VidOptions::default();
    for kind in [Kind::Float, Kind::BFloat16] {
        let pairs: Vec<(Tensor, Tensor, Tensor)> = (0..4)
            .map(|_| {
                let m = Tensor::randn([128, 64, 8, 8], (kind, device)).set_requires_grad(true);
                let t = Tensor::randn([128, 64, 8, 8], (kind, device));
                let a = Tensor::ones([64], (Kind::Float, device)).set_requires_grad(true);
                (m, t, a)
            })
            .collect();
        let inputs: Vec<&Tensor> = pairs.iter().flat_map(|(m, _, a)| [m, a]).collect();
        let grouped_step = || {
            let terms: Vec<VidTerm<'_>> = pairs
                .iter()
                .map(|(m, t, a)| VidTerm {
                    mean: m,
                    target: t,
                    log_scale: a,
                    weight: 1.0,
                })
                .collect();
            let loss = f_vid_loss_grouped(&terms, &opts).unwrap();
            let _ = Tensor::run_backward(&[&loss], &inputs, false, false);
        };
        let single_step = || {
            let loss = pairs
                .iter()
                .map(|(m, t, a)| f_vid_loss(m, t, a, &opts).unwrap().to_kind(Kind::Float))
                .reduce(|x, y| x + y)
                .unwrap();
            let _ = Tensor::run_backward(&[&loss], &inputs, false, false);
        };
        let plain_step = || {
            let loss = pairs
                .iter()
                .map(|(m, t, a)| plain_vid(m, t, a))
                .reduce(|x, y| x + y)
                .unwrap();
            let _ = Tensor::run_backward(&[&loss], &inputs, false, false);
        };
        let (g, s, p) = (
            time_ms(grouped_step),
            time_ms(single_step),
            time_ms(plain_step),
        );
        let replayed = graph_time_ms(grouped_step);
        println!(
            "  {kind:?}: grouped {g:.4}, single {s:.4}, plain tch {p:.4}, grouped graph-replayed {replayed:.4}"
        );
    }
}
