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
}

impl Default for VidOptions {
    /// `eps = 1e-5`, `Reduction::Mean`, `full = false`.
    fn default() -> Self {
        VidOptions {
            eps: 1e-5,
            reduction: Reduction::Mean,
            full: false,
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
