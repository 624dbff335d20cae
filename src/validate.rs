//! Argument checking: turns the user's tensors into a [`VidProblem`] the backends can trust
//! (same device, supported dtypes, a memory layout a kernel reads in place).

use tch::{Device, Kind, Tensor};

use crate::autograd;
use crate::error::{Result, VidError};
use crate::options::VidOptions;

/// How `mean`/`target` lie in memory. Channel = dim 1 in either case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[N][C][S]`: NCHW-contiguous; each `(n, c)` row holds `S = prod(spatial)` elements.
    ChannelsFirst,
    /// `[N][S][C]`: channels-last (NHWC strides), and `[N, C]` (S = 1); each row holds `C` elements.
    ChannelsLast,
}

/// The sizes of a problem, independent of the dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// `N`.
    pub batch: usize,
    /// `C`.
    pub channels: usize,
    /// `prod(S)`, 1 for `[N, C]` inputs.
    pub inner: usize,
    /// The memory layout of `mean`, `target` and of every per-element output.
    pub layout: Layout,
}

impl Geometry {
    /// `N * C * prod(S)`.
    pub fn numel(&self) -> usize {
        self.batch * self.channels * self.inner
    }

    /// `M = N * prod(S)`: elements per channel.
    pub fn per_channel(&self) -> usize {
        self.batch * self.inner
    }
}

/// A checked VID problem: detached inputs in one layout, plus sizes and options.
#[derive(Debug)]
pub struct VidProblem {
    /// The regressed mean, detached, in `geometry.layout`.
    pub mean: Tensor,
    /// The teacher features, detached, in `geometry.layout`.
    pub target: Tensor,
    /// `log_scale` (alpha), detached, rank 1, length C, contiguous.
    pub log_scale: Tensor,
    /// Sizes and layout.
    pub geometry: Geometry,
    /// The options, with eps checked.
    pub options: VidOptions,
}

impl VidProblem {
    /// dtype of `mean`/`target` (and of the loss).
    pub fn kind(&self) -> Kind {
        self.mean.kind()
    }

    /// The device all tensors live on.
    pub fn device(&self) -> Device {
        self.mean.device()
    }

    /// Brings a tensor of `mean`'s shape (an upstream gradient, say) into the problem's
    /// layout, detached; a lazily negated view is resolved.
    pub fn f_in_layout(&self, t: &Tensor) -> Result<Tensor> {
        to_layout(&resolved(t)?, self.geometry.layout)
    }

    /// When every element of `t` (a tensor of `mean`'s shape) is one value held once in
    /// memory (all strides 0, as `loss.sum().backward()` hands over), that value as a 0-dim
    /// alias, lazy negation resolved.
    pub fn f_broadcast_scalar(&self, t: &Tensor) -> Result<Option<Tensor>> {
        if t.numel() == 1 || t.stride().iter().any(|&s| s != 0) {
            return Ok(None);
        }
        let scalar = t.f_as_strided([0i64; 0], [0i64; 0], None)?;
        Ok(Some(resolved(&scalar)?))
    }

    /// [`VidProblem::f_in_layout`], panicking on failure.
    #[allow(dead_code)]
    pub fn in_layout(&self, t: &Tensor) -> Tensor {
        self.f_in_layout(t).unwrap_or_else(|e| panic!("{e}"))
    }
}

const FLOAT_KINDS: [Kind; 4] = [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16];

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

/// Names of c10's layouts, by code.
const LAYOUT_NAMES: [&str; 8] = [
    "strided",
    "sparse COO",
    "sparse CSR",
    "mkldnn",
    "sparse CSC",
    "sparse BSR",
    "sparse BSC",
    "jagged",
];

/// Refuses what the kernels cannot read as plain strided memory, before anything touches the
/// tensor's sizes (tch's accessors panic on nested tensors) or its data pointer. Returns
/// whether it is a lazily negated view.
fn check_plain(name: &'static str, t: &Tensor) -> Result<bool> {
    if !t.defined() {
        return Err(VidError::invalid(name, "tensor is undefined"));
    }
    let facts = autograd::tensor_facts(t).map_err(VidError::Torch)?;
    let refuse = |what: String| {
        Err(VidError::invalid(
            name,
            format!("expected a dense strided CPU or CUDA tensor, got {what}"),
        ))
    };
    if facts.is_nested {
        return refuse("a nested tensor".into());
    }
    if facts.layout != 0 {
        let layout = LAYOUT_NAMES.get(facts.layout as usize).map_or_else(
            || format!("layout code {}", facts.layout),
            |n| n.to_string(),
        );
        return refuse(format!(
            "a {layout} tensor (convert it with to_dense() first)"
        ));
    }
    if facts.is_quantized {
        return refuse("a quantized tensor (dequantize it first)".into());
    }
    if facts.device_type != 0 && facts.device_type != 1 {
        return refuse(format!("a tensor on c10 device type {}", facts.device_type));
    }
    if !facts.has_storage {
        return refuse("a tensor without storage".into());
    }
    if facts.is_conj {
        return refuse("a conjugate view".into());
    }
    Ok(facts.is_neg)
}

/// `t` as a tensor object of the op's own (which backends only read through its memory),
/// with a lazy negation (`_neg_view`) applied to the values in memory. Callers run under
/// no-grad, so no copy made here is recorded by autograd.
///
/// Never the caller's own tensor object (`shallow_clone` shares it): `Tensor::set_data`
/// (and tch's `VarStore::double()`, `half()`, ... which use it) swaps that object's storage,
/// dtype and strides without bumping its version counter, so a backward reading through it
/// with forward-time geometry would read out of bounds. `detach()` makes a new object that
/// keeps the forward-time storage alive and shares the version counter, so in-place changes
/// are still detected by autograd's saved-variable check.
fn resolved(t: &Tensor) -> Result<Tensor> {
    let is_neg = autograd::tensor_facts(t).map_err(VidError::Torch)?.is_neg;
    resolved_as(t, is_neg)
}

/// [`resolved`] when whether `t` is negated is already known.
fn resolved_as(t: &Tensor, is_neg: bool) -> Result<Tensor> {
    Ok(if is_neg {
        t.f_resolve_neg()?
    } else {
        t.f_detach()?
    })
}

/// The smallest `eps` a dtype's accumulation handles: below the smallest normal number of
/// the accumulation type, `1 / var` overflows where `log_scale` is very negative.
fn eps_floor(kind: Kind) -> (f64, &'static str) {
    match kind {
        Kind::Double => (f64::MIN_POSITIVE, "f64"),
        _ => (f32::MIN_POSITIVE as f64, "f32"),
    }
}

/// Checks every argument and normalises the layout. Never panics.
pub fn validate(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    options: &VidOptions,
) -> Result<VidProblem> {
    if !(options.eps.is_finite() && options.eps > 0.0) {
        return Err(VidError::invalid(
            "eps",
            format!("expected a finite value > 0, got {:e}", options.eps),
        ));
    }
    let negated = [
        check_plain("mean", mean)?,
        check_plain("target", target)?,
        check_plain("log_scale", log_scale)?,
    ];
    let kind = mean.f_kind()?;
    if !FLOAT_KINDS.contains(&kind) {
        return Err(VidError::invalid(
            "mean",
            format!("expected dtype f32, f64, f16 or bf16, got {kind:?}"),
        ));
    }
    let target_kind = target.f_kind()?;
    if target_kind != kind {
        return Err(VidError::invalid(
            "target",
            format!("expected the dtype of `mean` ({kind:?}), got {target_kind:?}"),
        ));
    }
    let scale_kind = log_scale.f_kind()?;
    if scale_kind != Kind::Float && scale_kind != kind {
        return Err(VidError::invalid(
            "log_scale",
            format!("expected dtype f32 or the inputs' dtype ({kind:?}), got {scale_kind:?}"),
        ));
    }
    let device = mean.device();
    for (name, t) in [("target", target), ("log_scale", log_scale)] {
        if t.device() != device {
            return Err(VidError::invalid(
                name,
                format!(
                    "expected the device of `mean` ({}), got {}",
                    device_name(device),
                    device_name(t.device())
                ),
            ));
        }
    }
    let shape = mean.size();
    if shape.len() < 2 {
        return Err(VidError::invalid(
            "mean",
            format!("expected shape [N, C, *spatial] (rank >= 2), got {shape:?}"),
        ));
    }
    if target.size() != shape {
        return Err(VidError::invalid(
            "target",
            format!(
                "expected the shape of `mean` {shape:?}, got {:?}",
                target.size()
            ),
        ));
    }
    if shape.contains(&0) {
        return Err(VidError::invalid(
            "mean",
            format!("expected a non-empty tensor, got shape {shape:?}"),
        ));
    }
    let channels = shape[1];
    let scale_shape = log_scale.size();
    if scale_shape != [channels] {
        return Err(VidError::invalid(
            "log_scale",
            format!("expected shape [{channels}] (one value per channel of `mean`), got {scale_shape:?}"),
        ));
    }

    let (floor, acc_name) = eps_floor(kind);
    if options.eps < floor {
        return Err(VidError::invalid(
            "eps",
            format!(
                "{:e} is below {floor:e}, the smallest normal {acc_name} (the accumulation type of {kind:?} inputs)",
                options.eps
            ),
        ));
    }

    let inner: i64 = shape[2..].iter().product();
    // Anything else is copied into the layout the kernels read best: rows of C when there
    // is no spatial extent, NCHW otherwise.
    let fallback = if inner == 1 {
        Layout::ChannelsLast
    } else {
        Layout::ChannelsFirst
    };
    let layout = layout_of(mean).unwrap_or(fallback);
    let geometry = Geometry {
        batch: shape[0] as usize,
        channels: channels as usize,
        inner: inner as usize,
        layout,
    };
    Ok(VidProblem {
        mean: to_layout(&resolved_as(mean, negated[0])?, layout)?,
        target: to_layout(&resolved_as(target, negated[1])?, layout)?,
        log_scale: {
            let t = resolved_as(log_scale, negated[2])?;
            if t.is_contiguous() {
                t
            } else {
                t.f_contiguous()?
            }
        },
        geometry,
        options: *options,
    })
}

/// The layout a tensor already has, if it is dense in one the kernels read in place.
fn layout_of(t: &Tensor) -> Option<Layout> {
    let size = t.size();
    let inner: i64 = size[2..].iter().product();
    if inner == 1 {
        // [N, C] (or all spatial dims 1): rows of C, whatever the memory format says.
        return is_dense_in_order(t, &channels_last_order(size.len()))
            .then_some(Layout::ChannelsLast);
    }
    if t.is_contiguous() {
        return Some(Layout::ChannelsFirst);
    }
    is_dense_in_order(t, &channels_last_order(size.len())).then_some(Layout::ChannelsLast)
}

/// Dim order, outermost first, of channels-last memory: N, spatial..., C.
fn channels_last_order(rank: usize) -> Vec<usize> {
    let mut order = vec![0];
    order.extend(2..rank);
    order.push(1);
    order
}

/// Whether `t` is densely packed with its dims nested in `order` (size-1 dims ignored).
fn is_dense_in_order(t: &Tensor, order: &[usize]) -> bool {
    let (size, stride) = (t.size(), t.stride());
    let mut expected = 1i64;
    for &d in order.iter().rev() {
        if size[d] != 1 && stride[d] != expected {
            return false;
        }
        expected *= size[d];
    }
    true
}

/// `t` in `layout`: a shallow alias when it already is, else a copy.
fn to_layout(t: &Tensor, layout: Layout) -> Result<Tensor> {
    if layout_of(t) == Some(layout) || (layout == Layout::ChannelsFirst && t.is_contiguous()) {
        return Ok(t.shallow_clone());
    }
    Ok(match layout {
        Layout::ChannelsFirst => t.f_contiguous()?,
        Layout::ChannelsLast => {
            let order: Vec<i64> = channels_last_order(t.dim())
                .iter()
                .map(|&d| d as i64)
                .collect();
            let mut inverse = vec![0i64; order.len()];
            for (position, &d) in order.iter().enumerate() {
                inverse[d as usize] = position as i64;
            }
            t.f_permute(&order[..])?
                .f_contiguous()?
                .f_permute(&inverse[..])?
        }
    })
}
