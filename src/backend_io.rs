//! What the compute backends take and return, shared by `backend` (the dispatch) and the
//! backends themselves, so that dependencies run one way: backend -> cpu | cuda -> here.

use tch::Tensor;

/// What forward produces: the loss, and what backward needs besides the inputs.
pub(crate) struct ForwardOutput {
    /// The per-element gradients the forward wrote for an upstream gradient of 1, if any.
    pub precomputed: Option<Precomputed>,
    /// The loss: a scalar (Mean, Sum) or the per-element tensor (None), in the inputs' dtype.
    pub loss: Tensor,
    /// Per-channel sums of squared differences `Q_c` (Mean and Sum only), in the backend's
    /// accumulation dtype.
    pub channel_sumsq: Option<Tensor>,
}

/// Which input gradients backward must produce (or a one-pass forward writes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NeedsGrad {
    pub mean: bool,
    pub target: bool,
    pub log_scale: bool,
}

impl NeedsGrad {
    /// No gradient.
    pub const NONE: NeedsGrad = NeedsGrad {
        mean: false,
        target: false,
        log_scale: false,
    };
}

/// Gradients in the problem's layout (and, for log_scale, any float dtype: the caller casts).
#[derive(Default)]
pub(crate) struct Grads {
    pub mean: Option<Tensor>,
    pub target: Option<Tensor>,
    pub log_scale: Option<Tensor>,
}

/// What a grouped forward produces: the weighted total and each problem's own output.
pub(crate) struct GroupForward {
    /// `sum_k w_k * loss_k`, a scalar (f32, or f64 when every problem is f64).
    pub total: Tensor,
    /// Per problem, its per-channel sums of squared differences (what backward needs).
    pub channel_sumsq: Vec<Tensor>,
    /// Per problem, the per-element gradients the forward wrote for an upstream gradient of
    /// 1 on the total (None where none was asked for, or the backend writes none).
    pub precomputed: Vec<Option<Precomputed>>,
}

/// Per-element gradients written by a forward (the one-pass path): exactly what the
/// backward computes for an upstream gradient of 1, in the problem's layout.
pub(crate) struct Precomputed {
    pub mean: Option<Tensor>,
    pub target: Option<Tensor>,
}

impl Precomputed {
    /// Whether these gradients cover what a backward needs.
    pub fn covers(&self, needs: &NeedsGrad) -> bool {
        (!needs.mean || self.mean.is_some()) && (!needs.target || self.target.is_some())
    }
}
