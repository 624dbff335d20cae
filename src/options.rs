//! Options of the VID loss.

/// How the per-element losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// The mean over all `N * C * prod(S)` elements (the reference implementations' choice).
    #[default]
    Mean,
    /// The sum over all elements.
    Sum,
    /// No reduction: the per-element loss, with the inputs' shape.
    None,
}

/// Options of [`crate::vid_loss`]: built with [`VidOptions::default`] and builder methods.
///
/// ```
/// use vidfuse::{Reduction, VidOptions};
/// let opts = VidOptions::default().eps(1e-6).reduction(Reduction::Sum).full(true);
/// assert_eq!(opts.reduction_mode(), Reduction::Sum);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VidOptions {
    pub(crate) eps: f64,
    pub(crate) reduction: Reduction,
    pub(crate) full: bool,
    pub(crate) gradients_in_forward: bool,
}

impl Default for VidOptions {
    /// `eps = 1e-5`, `Reduction::Mean`, `full = false`, gradients written in the forward.
    fn default() -> Self {
        VidOptions {
            eps: 1e-5,
            reduction: Reduction::Mean,
            full: false,
            gradients_in_forward: true,
        }
    }
}

impl VidOptions {
    /// The floor added to the softplus variance: `var_c = softplus(log_scale_c) + eps`. Must be finite and > 0.
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// How to reduce the per-element losses.
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Add the constant `0.5 * ln(2 * pi)` per element, giving the full Gaussian negative log-likelihood.
    pub fn full(mut self, full: bool) -> Self {
        self.full = full;
        self
    }

    /// One pass over the data per training step (default `true`): for `Mean`/`Sum`, when
    /// grad mode is on and `mean` or `target` requires grad, the forward also writes their
    /// gradients (for an upstream gradient of 1) while it reads the inputs, and a backward
    /// that receives exactly 1 (`loss.backward()`, or `total.backward()` with the loss
    /// added unscaled) returns them without touching the data again: 3 element-sized
    /// tensors of traffic per step instead of 5 (4 instead of 6 with a target gradient).
    /// Any other upstream gradient, or a second backward (`retain_graph`), recomputes them
    /// from the saved inputs, bitwise identical either way.
    ///
    /// The trade-off is memory: the gradient buffer is allocated in the forward and held
    /// until the backward, instead of being allocated in the backward. `false` keeps the
    /// two-pass path (the forward reads, the backward reads again and writes).
    ///
    /// ```
    /// use tch::{Device, Kind, Tensor};
    /// use vidfuse::{vid_loss, VidOptions};
    /// let o = (Kind::Float, Device::Cpu);
    /// let mut mean = Tensor::randn([8, 4, 3, 3], o).set_requires_grad(true);
    /// let target = Tensor::randn([8, 4, 3, 3], o);
    /// let log_scale = Tensor::zeros([4], o).set_requires_grad(true);
    /// let two_pass = VidOptions::default().gradients_in_forward(false);
    /// vid_loss(&mean, &target, &log_scale, &two_pass).backward();
    /// let g2 = mean.grad().copy();
    /// mean.zero_grad();
    /// vid_loss(&mean, &target, &log_scale, &VidOptions::default()).backward();
    /// assert!(mean.grad().equal(&g2)); // the same bits
    /// ```
    pub fn gradients_in_forward(mut self, on: bool) -> Self {
        self.gradients_in_forward = on;
        self
    }

    /// Whether the forward writes the gradients (see [`VidOptions::gradients_in_forward`]).
    pub fn writes_gradients_in_forward(&self) -> bool {
        self.gradients_in_forward
    }

    /// The variance floor.
    pub fn eps_value(&self) -> f64 {
        self.eps
    }

    /// The reduction.
    pub fn reduction_mode(&self) -> Reduction {
        self.reduction
    }

    /// Whether the constant term is included.
    pub fn is_full(&self) -> bool {
        self.full
    }
}
