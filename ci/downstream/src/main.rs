//! Uses vidfuse from another crate: the op (checked against the plain formula), a module, and
//! the CUDA stream helpers of `vidfuse::cuda::graph`, whose code calls into libc10_cuda (so
//! the binary only links when vidfuse tells it to link that library).
//!
//! With `VIDFUSE_DOWNSTREAM_EXPECT_CUDA_LIBS=1` it fails unless libtorch_cuda and libc10_cuda
//! are loaded in the process (they must be when the libtorch has them, or tch reports no CUDA
//! on a GPU machine).

use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};
use vidfuse::cuda::graph;
use vidfuse::nn::{VidConfig, VidLoss};
use vidfuse::{f_vid_loss, VidOptions};

fn main() {
    let expect_cuda_libs =
        std::env::var("VIDFUSE_DOWNSTREAM_EXPECT_CUDA_LIBS").as_deref() == Ok("1");
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(0);

    // The op, against the plain formula in f64.
    let mean = Tensor::randn([4, 8, 3, 3], opts).set_requires_grad(true);
    let target = Tensor::randn([4, 8, 3, 3], opts);
    let log_scale = Tensor::randn([8], opts).set_requires_grad(true);
    let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default())
        .unwrap_or_else(|e| panic!("f_vid_loss: {e}"));
    loss.backward();
    let var = (log_scale.to_kind(Kind::Double).softplus() + 1e-5).view([1, 8, 1, 1]);
    let d = mean.to_kind(Kind::Double) - target.to_kind(Kind::Double);
    let want = ((d.square() / &var + var.log()) * 0.5)
        .mean(Kind::Double)
        .double_value(&[]);
    let got = loss.double_value(&[]);
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
        "loss {got}, plain formula {want}"
    );
    assert!(mean.grad().defined() && log_scale.grad().defined());

    // A module and an optimizer step, the VID parameters in a group of their own.
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = VidConfig {
        log_scale_group: Some(1),
        ..Default::default()
    };
    let vid = VidLoss::new(&vs.root() / "vid", 8, 16, cfg);
    let mut opt = nn::Adam::default().build(&vs, 1e-3).expect("optimizer");
    opt.set_lr_group(1, 0.02);
    let s = Tensor::randn([4, 8, 6, 6], opts);
    let t = Tensor::randn([4, 16, 3, 3], opts);
    opt.backward_step(&vid.forward(&s, &t));

    // The CUDA helpers: a stream on a GPU, an error without one, never a link failure.
    match graph::current_stream(0) {
        Ok(stream) => println!("current CUDA stream: {stream:?}"),
        Err(e) => println!("no CUDA stream: {e}"),
    }
    match graph::with_new_stream(0, || {
        f_vid_loss(&mean, &target, &log_scale, &VidOptions::default())
    }) {
        Ok(_) => println!("ran on a new CUDA stream"),
        Err(e) => println!("no new CUDA stream: {e}"),
    }
    println!("tch sees CUDA: {}", tch::Cuda::is_available());

    if expect_cuda_libs {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
        for lib in ["libtorch_cuda.so", "libc10_cuda.so"] {
            assert!(
                maps.contains(lib),
                "{lib} is not loaded: the binary did not link it"
            );
            println!("{lib} is loaded");
        }
    }
    println!("downstream: ok (loss {got:.6}, plain formula {want:.6})");
}
