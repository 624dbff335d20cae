//! [`VidConfig`]: the settings of a VID module, checked against the VarStore that holds it.

use tch::Kind;

use crate::{Reduction, VidError, VidOptions};

/// Configuration of a [`VidLoss`](super::VidLoss); build it with `Default` and struct-update syntax, as
/// tch's own configs (`nn::ConvConfig`, `nn::LinearConfig`). The op's own [`VidOptions`] is
/// a builder with getters instead (its fields stay private so that options can be added);
/// [`VidConfig::options`] gives the op options of a config.
///
/// ```
/// use vidfuse::{nn::VidConfig, Reduction};
/// let cfg = VidConfig { init_variance: 1.0, hidden_channels: Some(64), ..Default::default() };
/// assert_eq!(cfg.eps, 1e-5);
/// assert_eq!(cfg.reduction, Reduction::Mean);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VidConfig {
    /// The per-channel variance at initialisation: `log_scale` starts at
    /// `ln(exp(init_variance - eps) - 1)` so that `softplus(log_scale) + eps == init_variance`.
    /// Default `5.0` (the reference implementations' value). Must be finite and `> eps`.
    pub init_variance: f64,
    /// The variance floor: `var_c = softplus(log_scale_c) + eps`. Default `1e-5`; finite, `> 0`.
    pub eps: f64,
    /// Width of the two hidden 1x1 convolutions of the VID-I regressor; `None` (the
    /// default) uses the teacher's channel count, as the paper. Ignored by the linear forms.
    pub hidden_channels: Option<i64>,
    /// How the per-element losses are reduced. Default [`Reduction::Mean`] (the mean over
    /// all `N * C * H * W` elements, as the reference implementations). With
    /// [`Reduction::None`] `forward` returns the per-element loss map.
    pub reduction: Reduction,
    /// Add `0.5 * ln(2 pi)` per element (the full Gaussian negative log-likelihood). It
    /// changes the value, not the gradients. Default `false`.
    pub full: bool,
    /// The tch optimizer parameter group `log_scale` is created in; `None` (the default)
    /// keeps the group of the path the module is built under. With `Some(g)`, give the
    /// variance its own learning rate with `opt.set_lr_group(g, lr)`: see
    /// [the module docs](crate::nn#learning-rate-of-the-variance) for why it matters.
    pub log_scale_group: Option<usize>,
}

impl Default for VidConfig {
    /// `init_variance = 5.0`, `eps = 1e-5`, hidden width = teacher's channels,
    /// `Reduction::Mean`, `full = false`, `log_scale` in the path's optimizer group.
    fn default() -> Self {
        VidConfig {
            init_variance: 5.0,
            eps: 1e-5,
            hidden_channels: None,
            reduction: Reduction::Mean,
            full: false,
            log_scale_group: None,
        }
    }
}

impl VidConfig {
    /// The op options these settings give.
    pub fn options(&self) -> VidOptions {
        VidOptions::default()
            .eps(self.eps)
            .reduction(self.reduction)
            .full(self.full)
    }

    /// The `log_scale` value whose variance is `init_variance`:
    /// `ln(exp(init_variance - eps) - 1)`, computed without overflow.
    ///
    /// ```
    /// let a = vidfuse::nn::VidConfig::default().initial_log_scale();
    /// assert!(((1.0 + a.exp()).ln() + 1e-5 - 5.0).abs() < 1e-12);
    /// ```
    pub fn initial_log_scale(&self) -> f64 {
        let x = self.init_variance - self.eps;
        // softplus^-1(x) = ln(e^x - 1) = x + ln(1 - e^-x)
        x + (-(-x).exp_m1()).ln()
    }

    /// Checks the settings on their own and against the dtype of the VarStore that will
    /// hold `log_scale` (`store_kind`): a config that every forward would refuse, or whose
    /// initial `log_scale` the store cannot hold, is refused here, before any variable exists.
    pub(super) fn validate(&self, store_kind: Kind) -> Result<(), VidError> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(VidError::invalid(
                "cfg.eps",
                format!("must be finite and > 0, got {:e}", self.eps),
            ));
        }
        // The op refuses an eps below the smallest normal number of its accumulation type:
        // f64 only for f64 features, which an f64 store implies (the modules compute in the
        // features' dtype; f32 otherwise).
        let (floor, acc_name) = if store_kind == Kind::Double {
            (f64::MIN_POSITIVE, "f64")
        } else {
            (f32::MIN_POSITIVE as f64, "f32")
        };
        if self.eps < floor {
            return Err(VidError::invalid(
                "cfg.eps",
                format!(
                    "{:e} is below {floor:e}, the smallest normal {acc_name} (the accumulation \
                     type of a VarStore of {store_kind:?}); every forward would refuse it",
                    self.eps
                ),
            ));
        }
        if !(self.init_variance.is_finite() && self.init_variance > self.eps) {
            return Err(VidError::invalid(
                "cfg.init_variance",
                format!(
                    "must be finite and > eps ({:e}), got {:e}",
                    self.eps, self.init_variance
                ),
            ));
        }
        let largest = largest_finite(store_kind);
        if self.initial_log_scale().abs() > largest {
            return Err(VidError::invalid(
                "cfg.init_variance",
                format!(
                    "{:e} needs a log_scale of {:e}, beyond the largest finite {store_kind:?} \
                     ({largest:e}) of the VarStore",
                    self.init_variance,
                    self.initial_log_scale()
                ),
            ));
        }
        if let Some(h) = self.hidden_channels {
            if h <= 0 {
                return Err(VidError::invalid(
                    "cfg.hidden_channels",
                    format!("must be > 0, got {h}"),
                ));
            }
        }
        Ok(())
    }
}

/// The largest finite value of a float dtype (f64's for any other).
fn largest_finite(kind: Kind) -> f64 {
    match kind {
        Kind::Float => f32::MAX as f64,
        Kind::Half => half::f16::MAX.to_f64(),
        Kind::BFloat16 => half::bf16::MAX.to_f64(),
        _ => f64::MAX,
    }
}
