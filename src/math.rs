//! The O(C) per-channel math shared by the CPU backend: stable softplus variance, sigmoid,
//! the loss epilogue and the log_scale gradient. All in f64.

use crate::options::{Reduction, VidOptions};
use crate::validate::Geometry;

/// `0.5 * ln(2 * pi)`, the per-element constant of the full Gaussian NLL.
pub const HALF_LN_TWO_PI: f64 = 0.918_938_533_204_672_8;

/// `ln(1 + e^x)` without overflow for large |x|.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `1 / (1 + e^-x)` without overflow for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Per-channel quantities derived from `log_scale`.
pub(crate) struct ChannelParams {
    /// `var_c = softplus(alpha_c) + eps`.
    pub var: Vec<f64>,
    /// `ln var_c`.
    pub ln_var: Vec<f64>,
    /// `sigmoid(alpha_c)` = d softplus / d alpha.
    pub sigmoid: Vec<f64>,
}

impl ChannelParams {
    pub fn new(alpha: &[f64], eps: f64) -> Self {
        let var: Vec<f64> = alpha.iter().map(|&a| softplus(a) + eps).collect();
        ChannelParams {
            ln_var: var.iter().map(|v| v.ln()).collect(),
            sigmoid: alpha.iter().map(|&a| sigmoid(a)).collect(),
            var,
        }
    }

    /// The per-element constant: `0.5 ln(2 pi)` when `full`, else 0.
    pub fn constant(&self, opts: &VidOptions) -> f64 {
        if opts.is_full() {
            HALF_LN_TWO_PI
        } else {
            0.0
        }
    }

    /// `k`: 1/n for Mean, 1 for Sum.
    pub fn reduction_factor(&self, geometry: &Geometry, reduction: Reduction) -> f64 {
        match reduction {
            Reduction::Mean => 1.0 / geometry.numel() as f64,
            Reduction::Sum | Reduction::None => 1.0,
        }
    }

    /// The Mean or Sum loss from the per-channel sums of squared differences `q`.
    pub fn reduced_loss(
        &self,
        q: &[f64],
        geometry: &Geometry,
        opts: &VidOptions,
        reduction: Reduction,
    ) -> f64 {
        let m = geometry.per_channel() as f64;
        let n = geometry.numel() as f64;
        let per_channel: f64 = q
            .iter()
            .zip(&self.var)
            .zip(&self.ln_var)
            .map(|((q, v), l)| 0.5 * (q / v + m * l))
            .sum();
        let sum = per_channel + n * self.constant(opts);
        sum * self.reduction_factor(geometry, reduction)
    }

    /// d loss / d alpha for Mean/Sum: `k * 0.5 * (M / var - Q / var^2) * sigmoid(alpha)`,
    /// with `k` = upstream gradient times the reduction factor.
    pub fn log_scale_grad(&self, q: &[f64], m: f64, k: f64) -> Vec<f64> {
        (0..q.len())
            .map(|c| self.channel_log_scale_grad(c, k * m, k * q[c]))
            .collect()
    }

    /// d loss / d alpha for None, from `r1 = sum G` and `r2 = sum G d^2` per channel.
    pub fn log_scale_grad_none(&self, r1: &[f64], r2: &[f64]) -> Vec<f64> {
        (0..r1.len())
            .map(|c| self.channel_log_scale_grad(c, r1[c], r2[c]))
            .collect()
    }

    /// `0.5 * (a / var - b / var^2) * sigmoid(alpha)` of channel `c`, ordered so that no
    /// intermediate overflows or underflows where the result does not: the reduction factor
    /// is already in `a` and `b` (`M / var` alone overflows for var near the eps floor), and
    /// `sigmoid / var` (at most about 1, as softplus >= sigmoid) is formed before meeting
    /// `a - b / var` (`var^2` underflows to 0 there; `(a / var) * sigmoid` is inf * 0).
    fn channel_log_scale_grad(&self, c: usize, a: f64, b: f64) -> f64 {
        let v = self.var[c];
        0.5 * (a - b / v) * (self.sigmoid[c] / v)
    }
}
