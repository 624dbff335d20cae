//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong in vidfuse. Messages name the argument and what was expected.
///
/// Non-exhaustive: new kinds of failure may be added without a breaking change.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VidError {
    /// An argument had a bad shape, dtype, device, layout or value.
    #[error("invalid argument `{arg}`: {message}")]
    InvalidArgument {
        /// The argument's name, as in the function signature (`mean`, `target`, `log_scale`, `eps`...).
        arg: &'static str,
        /// What was expected and what was found.
        message: String,
    },
    /// libtorch reported an error (a C++ exception caught at the boundary).
    #[error("libtorch error: {0}")]
    Torch(String),
    /// The autograd shim or a backward callback failed.
    #[error("autograd error: {0}")]
    Autograd(String),
    /// CUDA is not usable: no driver, no libnvrtc, or libtorch built without CUDA.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// NVRTC failed to compile a kernel source; the compiler log is attached.
    #[error(
        "NVRTC failed to compile {source_name} for {arch}: {message}\n--- compiler log ---\n{log}"
    )]
    Compile {
        /// Which kernel source.
        source_name: String,
        /// The target architecture, e.g. `sm_90`.
        arch: String,
        /// NVRTC's status.
        message: String,
        /// NVRTC's program log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {call}: {message}")]
    Driver {
        /// The call that failed.
        call: &'static str,
        /// The driver's message.
        message: String,
    },
    /// A bug in vidfuse: a panic inside the op, caught before it reached the caller.
    #[error("internal error in vidfuse (please report it): {0}")]
    Internal(String),
    /// An environment variable of the distributed launch (torchrun's `RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) is missing, garbled or inconsistent.
    #[error("bad distributed environment: `{var}`: {message}")]
    Environment {
        /// The variable's name.
        var: &'static str,
        /// What was expected and what was found.
        message: String,
    },
    /// A distributed operation failed: rendezvous, a collective (a peer died, or did not
    /// arrive within the timeout), or the data-parallel gradient reduction.
    #[error("distributed error in {op}: {message}")]
    Distributed {
        /// What was being done (`rendezvous`, `all_reduce`, `backward`...).
        op: &'static str,
        /// libtorch's (c10d's) message.
        message: String,
    },
    /// A kernel launch failed (on the device or in the host emulation).
    #[error("kernel launch `{kernel}` failed: {message}")]
    Launch {
        /// The kernel's name.
        kernel: String,
        /// Why.
        message: String,
    },
}

impl VidError {
    pub(crate) fn invalid(arg: &'static str, message: impl Into<String>) -> Self {
        VidError::InvalidArgument {
            arg,
            message: message.into(),
        }
    }
}

impl From<tch::TchError> for VidError {
    fn from(e: tch::TchError) -> Self {
        VidError::Torch(e.to_string())
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = VidError> = std::result::Result<T, E>;
