//! Ops: what a pass computes per element, with per-channel parameters.

use super::element::Acc;

// Ops: what a pass does per element

/// Per-channel parameters of an op, one value per channel each.
pub(super) struct ChannelValues<A> {
    pub(super) first: Vec<A>,
    pub(super) second: Vec<A>,
}

impl<A: Acc> ChannelValues<A> {
    /// One parameter per channel (the second is unused, zero).
    pub(super) fn single(first: impl Iterator<Item = f64>) -> Self {
        let first: Vec<A> = first.map(A::from_f64).collect();
        ChannelValues {
            second: vec![A::default(); first.len()],
            first,
        }
    }

    pub(super) fn new(first: impl Iterator<Item = f64>, second: impl Iterator<Item = f64>) -> Self {
        ChannelValues {
            first: first.map(A::from_f64).collect(),
            second: second.map(A::from_f64).collect(),
        }
    }
}

/// What a pass computes per element.
pub(super) trait Op<A: Acc>: Sync {
    /// Per-channel sums the op accumulates (0, 1 or 2).
    const SUMS: usize;
    /// Whether the op reads a per-element upstream gradient.
    const READS_UPSTREAM: bool;
    /// Whether the op writes a per-element result.
    const WRITES: bool;
    /// Given the channel's two parameters, mean, target and upstream values: the result and
    /// the additions to the (up to two) sums.
    fn step(p: A, q: A, m: A, t: A, g: A) -> (A, A, A);
}

/// `Q_c += d^2`.
pub(super) struct SumSq;
impl<A: Acc> Op<A> for SumSq {
    const SUMS: usize = 1;
    const READS_UPSTREAM: bool = false;
    const WRITES: bool = false;
    #[inline(always)]
    fn step(_: A, _: A, m: A, t: A, _: A) -> (A, A, A) {
        let d = m - t;
        (A::default(), d * d, A::default())
    }
}

/// Per-element loss `p d^2 + q` (p = 0.5 / var, q = 0.5 ln var + constant).
pub(super) struct ElementLoss;
impl<A: Acc> Op<A> for ElementLoss {
    const SUMS: usize = 0;
    const READS_UPSTREAM: bool = false;
    const WRITES: bool = true;
    #[inline(always)]
    fn step(p: A, q: A, m: A, t: A, _: A) -> (A, A, A) {
        let d = m - t;
        (p * d * d + q, A::default(), A::default())
    }
}

/// Gradient of mean for Mean/Sum: `p d` (p = g k / var).
pub(super) struct ScaledDifference;
impl<A: Acc> Op<A> for ScaledDifference {
    const SUMS: usize = 0;
    const READS_UPSTREAM: bool = false;
    const WRITES: bool = true;
    #[inline(always)]
    fn step(p: A, _: A, m: A, t: A, _: A) -> (A, A, A) {
        (p * (m - t), A::default(), A::default())
    }
}

/// The one-pass forward: `Q_c += d^2` and the gradient of mean for an upstream gradient of
/// 1, `p d` (p = w k / var), exactly as [`ScaledDifference`] computes it then.
pub(super) struct SumSqAndGradient;
impl<A: Acc> Op<A> for SumSqAndGradient {
    const SUMS: usize = 1;
    const READS_UPSTREAM: bool = false;
    const WRITES: bool = true;
    #[inline(always)]
    fn step(p: A, _: A, m: A, t: A, _: A) -> (A, A, A) {
        let d = m - t;
        (p * d, d * d, A::default())
    }
}

/// Gradient of mean for None: `G d p` (p = 1 / var), with `R1 += G`, `R2 += G d^2`.
pub(super) struct NoneBackward;
impl<A: Acc> Op<A> for NoneBackward {
    const SUMS: usize = 2;
    const READS_UPSTREAM: bool = true;
    const WRITES: bool = true;
    #[inline(always)]
    fn step(p: A, _: A, m: A, t: A, g: A) -> (A, A, A) {
        let d = m - t;
        (g * d * p, g, g * d * d)
    }
}

/// Applies `O` to a run of elements: element j has parameters `p[j]`, `q[j]`. All slices
/// have the run's length (`up`, `out` and the sums only where the op uses them).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn apply<A: Acc, O: Op<A>>(
    p: &[A],
    q: &[A],
    m: &[A],
    t: &[A],
    up: &[A],
    out: &mut [A],
    sum0: &mut [A],
    sum1: &mut [A],
) {
    let n = m.len();
    let (p, q, m, t) = (&p[..n], &q[..n], &m[..n], &t[..n]);
    let up = if O::READS_UPSTREAM { &up[..n] } else { m };
    let out = if O::WRITES {
        &mut out[..n]
    } else {
        &mut [][..]
    };
    let sum0 = if O::SUMS > 0 {
        &mut sum0[..n]
    } else {
        &mut [][..]
    };
    let sum1 = if O::SUMS > 1 {
        &mut sum1[..n]
    } else {
        &mut [][..]
    };
    for j in 0..n {
        let (r, a0, a1) = O::step(p[j], q[j], m[j], t[j], up[j]);
        if O::WRITES {
            out[j] = r;
        }
        if O::SUMS > 0 {
            sum0[j] = sum0[j] + a0;
        }
        if O::SUMS > 1 {
            sum1[j] = sum1[j] + a1;
        }
    }
}
