//! Creating a module's parameters: every tensor is made (and every size checked) before
//! any is registered, so a refused constructor leaves the VarStore as it was.

use tch::{nn, Device, Tensor};

use crate::VidError;

/// A VarStore on a CUDA device that libtorch does not see is one clear line, not the
/// C++ trace of a failed allocation.
fn check_device(device: Device) -> Result<(), VidError> {
    if let Device::Cuda(ordinal) = device {
        let visible = tch::Cuda::device_count();
        if ordinal as i64 >= visible {
            return Err(VidError::CudaUnavailable(format!(
                "the VarStore is on cuda:{ordinal}, but libtorch sees {visible} CUDA device(s) \
                 (no GPU, no driver, or a CPU-only libtorch)"
            )));
        }
    }
    Ok(())
}

pub(super) fn check_dim(arg: &'static str, n: i64, what: &str) -> Result<(), VidError> {
    if n <= 0 {
        return Err(VidError::invalid(
            arg,
            format!("{what} must be > 0, got {n}"),
        ));
    }
    Ok(())
}

/// A parameter a constructor is about to create: where under the module's path, its shape
/// and its initialisation.
pub(super) struct ParamSpec {
    /// Sub-path under the module's path, e.g. `["regressor", "0"]`.
    path: Vec<String>,
    name: &'static str,
    dims: Vec<i64>,
    init: nn::Init,
    /// The optimizer group, when not the module path's.
    pub(super) group: Option<usize>,
}

impl ParamSpec {
    pub(super) fn new(path: &[&str], name: &'static str, dims: &[i64], init: nn::Init) -> Self {
        ParamSpec {
            path: path.iter().map(|s| s.to_string()).collect(),
            name,
            dims: dims.to_vec(),
            init,
            group: None,
        }
    }

    /// Uniform in `+-1/sqrt(fan_in)`: PyTorch's default for the weights of `nn.Linear` and
    /// `nn.Conv2d` (`kaiming_uniform_(a = sqrt(5))`) and for their biases.
    pub(super) fn pytorch_default(
        path: &[&str],
        name: &'static str,
        dims: &[i64],
        fan_in: i64,
    ) -> Self {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Self::new(
            path,
            name,
            dims,
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )
    }

    fn display_name(&self) -> String {
        let mut parts = self.path.clone();
        parts.push(self.name.to_string());
        parts.join(".")
    }
}

/// The tensors of a module, created but not yet in the VarStore. Constructors create every
/// tensor first and register them only once all exist, so a refused or failed constructor
/// leaves nothing behind (no orphan parameter gets optimised or saved).
pub(super) struct PendingParams {
    params: Vec<(ParamSpec, Tensor)>,
}

impl PendingParams {
    /// Checks every size (no overflow, allocatable), then creates every tensor.
    pub(super) fn create(vs: &nn::Path, specs: Vec<ParamSpec>) -> Result<PendingParams, VidError> {
        let bytes_per_element = vs.kind().elt_size_in_bytes() as i64;
        for spec in &specs {
            let numel = spec
                .dims
                .iter()
                .try_fold(1i64, |acc, &d| acc.checked_mul(d))
                .filter(|n| n.checked_mul(bytes_per_element).is_some());
            if numel.is_none() {
                return Err(VidError::invalid(
                    "size",
                    format!(
                        "the parameter `{}` would have shape {:?}: more elements than can be addressed",
                        spec.display_name(),
                        spec.dims
                    ),
                ));
            }
        }
        check_device(vs.device())?;
        let mut params = Vec::with_capacity(specs.len());
        for spec in specs {
            let tensor =
                nn::f_init(spec.init, &spec.dims, vs.device(), vs.kind()).map_err(|e| {
                    // libtorch's first line says what failed; the rest are C++ stack frames.
                    let message = e.to_string();
                    let first = message.lines().next().unwrap_or_default();
                    VidError::Torch(format!("creating `{}`: {first}", spec.display_name()))
                })?;
            params.push((spec, tensor));
        }
        Ok(PendingParams { params })
    }

    /// Adds every tensor to the VarStore under `vs` as a trainable variable, in order.
    pub(super) fn register(self, vs: &nn::Path) -> Vec<Tensor> {
        self.params
            .into_iter()
            .map(|(spec, tensor)| {
                let base = match spec.group {
                    Some(group) => vs.set_group(group),
                    None => vs.clone(),
                };
                let path = spec.path.iter().fold(base, |p, part| p / part.as_str());
                path.add(spec.name, tensor, true)
            })
            .collect()
    }
}
