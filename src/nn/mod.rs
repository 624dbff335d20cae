//! VID as a trainable tch module: the mean regressor and the per-channel variance live in a
//! tch [`VarStore`](https://docs.rs/tch/latest/tch/nn/struct.VarStore.html), the loss itself
//! is the fused [`crate::f_vid_loss`].
//!
//! * [`VidLoss::new`] — VID-I on feature maps: `[N, Cs, Hs, Ws]` student, `[N, Ct, Ht, Wt]`
//!   teacher, a 1x1-convolution regressor (conv -> ReLU -> conv -> ReLU -> conv, no bias).
//! * [`VidLoss::linear`] — VID-LP / vectors: `[N, Ds]` student, `[N, Dt]` teacher, a linear
//!   regressor (e.g. student logits -> the teacher's penultimate layer).
//! * [`VidLoss::vector_to_map`] — heterogeneous students: a `[N, D]` vector (an MLP's hidden
//!   layer) regressed onto a teacher's `[N, C, H, W]` map.
//! * [`VidDistiller`] — several pairs with weights `lambda_k`, summed.
//!
//! The parameters of a `VidLoss` built under the path `p` are
//!
//! | name | shape | what |
//! | --- | --- | --- |
//! | `p.log_scale` | `[Ct]` | `alpha`, with `var_c = softplus(alpha_c) + eps` |
//! | `p.regressor.0.weight`, `p.regressor.2.weight`, `p.regressor.4.weight` | `[H, Cs, 1, 1]`, `[H, H, 1, 1]`, `[Ct, H, 1, 1]` | VID-I regressor |
//! | `p.regressor.weight`, `p.regressor.bias` | `[Dt, Ds]`, `[Dt]` (or `[Ct*H*W, D]`, `[Ct*H*W]`) | linear forms |
//!
//! (the VID-I names match the PyTorch reference implementation's `state_dict`), so saving
//! and loading the `VarStore` and any tch optimizer work as for any other module.
//!
//! ```
//! use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
//! use vidfuse::nn::VidLoss;
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let vid = VidLoss::new(&vs.root() / "vid1", 16, 32, Default::default());
//! let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
//!
//! let s_feat = Tensor::randn([4, 16, 8, 8], (Kind::Float, Device::Cpu)); // student features
//! let t_feat = Tensor::randn([4, 32, 4, 4], (Kind::Float, Device::Cpu)); // teacher features
//! let lambda = 1.0;
//! let loss = vid.forward(&s_feat, &t_feat) * lambda; // student map pooled to 4x4
//! opt.backward_step(&loss);
//! assert_eq!(vid.variance().size(), vec![32]);
//! ```
//!
//! # Mixed precision
//!
//! The modules compute in the student features' dtype, as PyTorch's autocast would: the
//! regressor's weights are cast on each call (a cast inside the autograd graph), the teacher
//! is cast to that dtype, and the fused op gets `log_scale` in f32. So bf16 activations with
//! the usual f32 master weights give a bf16 loss whose gradients reach the f32 parameters in
//! f32; f64 features give an f64 loss; after `vs.half()`, f32 features still give an f32
//! loss. Parameters and their gradients always stay in the VarStore's dtype.
//!
//! # Initialisation
//!
//! The regressors start as PyTorch's `nn.Conv2d` and `nn.Linear` do (and so as the reference
//! implementation, which uses them): weights, and biases where there are any, uniform in
//! `+-1/sqrt(fan_in)`, `fan_in` being the input channels of a 1x1 convolution or the input
//! size of a linear layer. (tch's own default, Kaiming-uniform with the ReLU gain, has 6
//! times that variance.) `log_scale` starts where the variance is `init_variance`.
//!
//! # Learning rate of the variance
//!
//! Adam moves every parameter by about its learning rate per step, whatever the size of its
//! gradient, and at the initial variance 5 `softplus` is nearly the identity: the variance
//! moves by about the learning rate per step. At a network's usual 1e-3 it hardly leaves 5
//! in a short run, and the VID term stays a weak regression loss. Measured with an earlier
//! version of `examples/mnist_vid.rs` (CNN teacher, CNN and MLP students, 400 images per
//! class, 300 Adam steps of batch 64, network learning rate 1e-3, one seed), the mean
//! per-channel variance after 300 steps went from 5 to:
//!
//! | learning rate of `log_scale` | CNN student | MLP student |
//! | --- | --- | --- |
//! | 1e-3 (the network's) | 4.69 (channels 4.64-4.70) | 4.69 (4.65-4.70) |
//! | 5e-3 | 3.36 (3.14-3.42) | 3.36 (3.21-3.40) |
//! | 2e-2 | 0.24 (0.04-0.55) | 0.27 (0.04-0.88) |
//!
//! Under SGD with momentum (the reference implementations' optimizer) the gradient of the
//! mean-reduced loss reaches each `log_scale` divided by the channel count, and at the
//! network's learning rate (0.05) the variance again stays near 5 for hundreds of steps. In
//! the example's current protocol, 1,100 SGD steps with `log_scale` at 5 (CNN student) or 0.5
//! (MLP student) bring each channel's variance to the mean squared residual of its regressed
//! map, the variance's maximum-likelihood value (median ratio 1.01-1.09 over channels; see
//! `results/EXPERIMENT.md`, which also finds that this did not make VID-I help on MNIST).
//!
//! So give `log_scale` an optimizer group of its own and a larger learning rate:
//!
//! ```
//! use tch::{nn, nn::OptimizerConfig, Device};
//! use vidfuse::nn::{VidConfig, VidLoss};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let cfg = VidConfig { log_scale_group: Some(1), ..Default::default() };
//! let vid = VidLoss::new(&vs.root() / "vid", 16, 32, cfg);
//! let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap(); // every group at 1e-3
//! vid.f_set_log_scale_lr(&mut opt, 0.02).unwrap(); // then log_scale at 2e-2
//! ```
//!
//! The order: build the module (with its group), then the optimizer, then set the rate
//! ([`VidLoss::f_set_log_scale_lr`] is an error, not a panic inside libtorch, when the module
//! has no group of its own or the optimizer does not hold it; it also works for a module
//! created after the optimizer). tch's `opt.set_lr(lr)` sets every group, the variance's
//! included: a schedule calls `set_log_scale_lr` again after it. The whole module can also
//! go into a group, through the path: `VidLoss::new(vs.root().set_group(1) / "vid", ...)`.
//!
//! # Checkpoints
//!
//! The VID parameters are training-time helpers: keep them in a VarStore of their own, with
//! an optimizer of their own, and the student's checkpoint holds only the student (it then
//! loads into the student's plain VarStore, at inference or for fine-tuning):
//!
//! ```
//! use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
//! use vidfuse::nn::VidLoss;
//!
//! let student_vs = nn::VarStore::new(Device::Cpu);
//! let vid_vs = nn::VarStore::new(Device::Cpu);
//! let student = nn::conv2d(student_vs.root() / "conv", 3, 16, 3, Default::default());
//! let vid = VidLoss::new(&vid_vs.root() / "vid", 16, 32, Default::default());
//! let mut opt = nn::Sgd::default().build(&student_vs, 0.05).unwrap();
//! let mut opt_vid = nn::Sgd::default().build(&vid_vs, 0.05).unwrap();
//!
//! let x = Tensor::randn([4, 3, 10, 10], (Kind::Float, Device::Cpu));
//! let teacher_features = Tensor::randn([4, 32, 8, 8], (Kind::Float, Device::Cpu));
//! let loss = vid.forward(&x.apply(&student), &teacher_features);
//! opt.zero_grad();
//! opt_vid.zero_grad();
//! loss.backward();
//! opt.step();
//! opt_vid.step();
//!
//! let file = std::env::temp_dir().join(format!("student-{}.safetensors", std::process::id()));
//! student_vs.save(&file).unwrap(); // the student alone
//! let mut reloaded = nn::VarStore::new(Device::Cpu);
//! let _student = nn::conv2d(reloaded.root() / "conv", 3, 16, 3, Default::default());
//! reloaded.load(&file).unwrap();
//! # std::fs::remove_file(&file).unwrap();
//! ```
//!
//! With one VarStore for both, save it whole, and load a student-only checkpoint with
//! `VarStore::load_partial` (which skips the `vid.*` names it does not find).

mod config;
mod distiller;
mod loss;
mod params;

pub use config::VidConfig;
pub use distiller::{VidDistiller, VidPair};
pub use loss::VidLoss;
