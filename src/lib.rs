//! vidfuse: the Variational Information Distillation loss, fused.
pub mod error;
pub mod options;
