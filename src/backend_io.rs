//! What the compute backends take and return, shared by `backend` (the dispatch) and the
//! backends themselves, so that dependencies run one way: backend -> cpu | cuda -> here.

use tch::Tensor;

/// What forward produces: the loss, and what backward needs besides the inputs.
pub(crate) struct ForwardOutput {
    /// The loss: a scalar (Mean, Sum) or the per-element tensor (None), in the inputs' dtype.
    pub loss: Tensor,
    /// Per-channel sums of squared differences `Q_c` (Mean and Sum only), in the backend's
    /// accumulation dtype.
    pub channel_sumsq: Option<Tensor>,
}

/// Which input gradients backward must produce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NeedsGrad {
    pub mean: bool,
    pub target: bool,
    pub log_scale: bool,
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
}
