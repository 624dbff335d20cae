//! [`VidDistiller`]: several layer pairs, their weighted sum as one grouped op.

use std::borrow::Borrow;

use tch::{nn, Tensor};

use super::config::VidConfig;
use super::loss::{OpInputs, VidLoss};
use crate::{f_vid_loss, f_vid_loss_grouped, Reduction, VidError, VidOptions, VidTerm};

fn check_lambda(lambda: f64) -> Result<(), VidError> {
    if !lambda.is_finite() {
        return Err(VidError::invalid(
            "lambda",
            format!("must be finite, got {lambda}"),
        ));
    }
    Ok(())
}

/// `e` with the pair's index in its message.
fn in_pair(k: usize, e: VidError) -> VidError {
    match e {
        VidError::InvalidArgument { arg, message } => VidError::InvalidArgument {
            arg,
            message: format!("pair {k}: {message}"),
        },
        other => other,
    }
}

/// One VID-I layer pair of a [`VidDistiller`]: the student's and the teacher's channel
/// counts and the pair's weight `lambda`.
///
/// ```
/// use vidfuse::nn::VidPair;
/// let p = VidPair::new(64, 128, 0.5);
/// assert_eq!(p, VidPair { student_channels: 64, teacher_channels: 128, lambda: 0.5 });
/// assert_eq!(p, VidPair::from((64, 128, 0.5)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VidPair {
    /// Channels of the student's feature map.
    pub student_channels: i64,
    /// Channels of the teacher's feature map.
    pub teacher_channels: i64,
    /// The pair's weight in the sum (finite).
    pub lambda: f64,
}

impl VidPair {
    /// A pair of `student_channels` -> `teacher_channels` with weight `lambda`.
    pub fn new(student_channels: i64, teacher_channels: i64, lambda: f64) -> VidPair {
        VidPair {
            student_channels,
            teacher_channels,
            lambda,
        }
    }
}

impl From<(i64, i64, f64)> for VidPair {
    /// `(student_channels, teacher_channels, lambda)`.
    fn from((student_channels, teacher_channels, lambda): (i64, i64, f64)) -> VidPair {
        VidPair::new(student_channels, teacher_channels, lambda)
    }
}

/// Several student/teacher layer pairs, each a [`VidLoss`] with a weight `lambda_k`;
/// `forward` gives `sum_k lambda_k * L_k`.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use vidfuse::nn::VidDistiller;
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// // (student channels, teacher channels, lambda) per pair, under vid.0, vid.1
/// let vid = VidDistiller::new(&vs.root() / "vid", &[(8, 16, 1.0), (16, 32, 0.5)], Default::default());
/// let opts = (Kind::Float, Device::Cpu);
/// let s = [Tensor::randn([2, 8, 8, 8], opts), Tensor::randn([2, 16, 4, 4], opts)];
/// let t = [Tensor::randn([2, 16, 8, 8], opts), Tensor::randn([2, 32, 4, 4], opts)];
/// let loss = vid.forward(&s, &t);
/// assert_eq!(loss.dim(), 0);
/// assert!(vid.f_forward(&s[..1], &t).is_err()); // counts differ
/// ```
#[derive(Debug, Default)]
pub struct VidDistiller {
    pairs: Vec<(VidLoss, f64)>,
}

impl VidDistiller {
    /// VID-I pairs from `(student_channels, teacher_channels, lambda)`, the k-th under
    /// `vs / k`. Returns an error on a bad channel count or config. The same as
    /// [`VidDistiller::f_with_pairs`] with positional tuples.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[(i64, i64, f64)],
        cfg: VidConfig,
    ) -> Result<VidDistiller, VidError> {
        let pairs: Vec<VidPair> = pairs.iter().map(|&p| p.into()).collect();
        Self::f_with_pairs(vs, &pairs, cfg)
    }

    /// VID-I pairs (panicking form of [`VidDistiller::f_new`]).
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[(i64, i64, f64)],
        cfg: VidConfig,
    ) -> VidDistiller {
        Self::f_new(vs, pairs, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// VID-I pairs, the k-th under `vs / k`. Returns an error on a bad channel count,
    /// weight or config; then no variable is created.
    pub fn f_with_pairs<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[VidPair],
        cfg: VidConfig,
    ) -> Result<VidDistiller, VidError> {
        let configured: Vec<(VidPair, VidConfig)> = pairs.iter().map(|&p| (p, cfg)).collect();
        Self::f_with_pair_configs(vs, &configured)
    }

    /// VID-I pairs, each with its own config (hidden width, initial variance, optimizer
    /// group of `log_scale`, ...), the k-th under `vs / k`. Returns an error on a bad channel
    /// count, weight or config (the message names the pair); then no variable is created.
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use vidfuse::nn::{VidConfig, VidDistiller, VidPair};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let narrow = VidConfig { hidden_channels: Some(32), ..Default::default() };
    /// let wide = VidConfig { hidden_channels: Some(256), ..Default::default() };
    /// let vid = VidDistiller::f_with_pair_configs(
    ///     &vs.root() / "vid",
    ///     &[(VidPair::new(16, 64, 1.0), narrow), (VidPair::new(32, 128, 1.0), wide)],
    /// )
    /// .unwrap();
    /// assert_eq!(vid.pairs()[1].0.config().hidden_channels, Some(256));
    /// ```
    pub fn f_with_pair_configs<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[(VidPair, VidConfig)],
    ) -> Result<VidDistiller, VidError> {
        let vs = vs.borrow();
        // Everything is checked and every tensor created before any is registered: a refused
        // pair leaves the VarStore as it was.
        for (k, (pair, _)) in pairs.iter().enumerate() {
            check_lambda(pair.lambda).map_err(|e| in_pair(k, e))?;
        }
        let pending = pairs
            .iter()
            .enumerate()
            .map(|(k, (pair, cfg))| {
                VidLoss::pending_conv(
                    &(vs / k),
                    pair.student_channels,
                    pair.teacher_channels,
                    *cfg,
                )
                .map_err(|e| in_pair(k, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut d = VidDistiller::empty();
        for (k, (loss, (pair, _))) in pending.into_iter().zip(pairs).enumerate() {
            d.pairs.push((loss.register(&(vs / k)), pair.lambda));
        }
        Ok(d)
    }

    /// VID-I pairs with their own configs (panicking form of
    /// [`VidDistiller::f_with_pair_configs`]).
    pub fn with_pair_configs<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[(VidPair, VidConfig)],
    ) -> VidDistiller {
        Self::f_with_pair_configs(vs, pairs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets the learning rate of every pair's variance (`log_scale`) on `opt`; see
    /// [`VidLoss::f_set_log_scale_lr`]. Every pair must have its `log_scale` in an optimizer
    /// group of its own (`VidConfig::log_scale_group`); pairs may share one.
    pub fn f_set_log_scale_lr(&self, opt: &mut nn::Optimizer, lr: f64) -> Result<(), VidError> {
        if self.pairs.is_empty() {
            return Err(VidError::invalid("self", "the distiller has no VID pair"));
        }
        for (k, (vid, _)) in self.pairs.iter().enumerate() {
            vid.f_set_log_scale_lr(opt, lr).map_err(|e| in_pair(k, e))?;
        }
        Ok(())
    }

    /// Sets the learning rate of every pair's variance (panicking form of
    /// [`VidDistiller::f_set_log_scale_lr`]).
    pub fn set_log_scale_lr(&self, opt: &mut nn::Optimizer, lr: f64) {
        self.f_set_log_scale_lr(opt, lr)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// VID-I pairs (panicking form of [`VidDistiller::f_with_pairs`]).
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use vidfuse::nn::{VidDistiller, VidPair};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let pairs = [VidPair::new(8, 16, 1.0), VidPair::new(16, 32, 0.5)];
    /// let vid = VidDistiller::with_pairs(&vs.root() / "vid", &pairs, Default::default());
    /// assert_eq!(vid.lambdas(), vec![1.0, 0.5]);
    /// ```
    pub fn with_pairs<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[VidPair],
        cfg: VidConfig,
    ) -> VidDistiller {
        Self::f_with_pairs(vs, pairs, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A distiller with no pairs; add them with [`VidDistiller::push`] (any mix of
    /// VID-I, linear and vector -> map losses).
    pub fn empty() -> VidDistiller {
        VidDistiller { pairs: Vec::new() }
    }

    /// Adds a pair with weight `lambda` (finite); returns an error otherwise.
    pub fn f_push(&mut self, loss: VidLoss, lambda: f64) -> Result<&mut Self, VidError> {
        check_lambda(lambda)?;
        self.pairs.push((loss, lambda));
        Ok(self)
    }

    /// Adds a pair with weight `lambda` (panicking form of [`VidDistiller::f_push`]).
    pub fn push(&mut self, loss: VidLoss, lambda: f64) -> &mut Self {
        self.f_push(loss, lambda).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The pairs and their weights.
    pub fn pairs(&self) -> &[(VidLoss, f64)] {
        &self.pairs
    }

    /// The pairs' weights, in order.
    pub fn lambdas(&self) -> Vec<f64> {
        self.pairs.iter().map(|(_, lambda)| *lambda).collect()
    }

    /// Sets the weight of pair `k` (for a schedule: warm-up, decay). Returns an error when
    /// there is no pair `k` or `lambda` is not finite; then nothing changes.
    pub fn f_set_lambda(&mut self, k: usize, lambda: f64) -> Result<(), VidError> {
        check_lambda(lambda).map_err(|e| in_pair(k, e))?;
        let n = self.pairs.len();
        let pair = self.pairs.get_mut(k).ok_or_else(|| {
            VidError::invalid("k", format!("no pair {k}: the distiller has {n} pairs"))
        })?;
        pair.1 = lambda;
        Ok(())
    }

    /// Sets the weight of pair `k` (panicking form of [`VidDistiller::f_set_lambda`]).
    ///
    /// ```
    /// use tch::{nn, Device};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let mut vid = vidfuse::nn::VidDistiller::new(vs.root(), &[(4, 8, 1.0)], Default::default());
    /// for step in 0..100 {
    ///     vid.set_lambda(0, (step as f64 / 50.0).min(1.0)); // linear warm-up
    /// }
    /// assert_eq!(vid.lambdas(), vec![1.0]);
    /// ```
    pub fn set_lambda(&mut self, k: usize, lambda: f64) {
        self.f_set_lambda(k, lambda)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Checks the counts, then each pair's op inputs (errors name the pair).
    fn op_inputs(
        &self,
        students: &[Tensor],
        teachers: &[Tensor],
    ) -> Result<Vec<OpInputs>, VidError> {
        if students.len() != self.pairs.len() {
            return Err(VidError::invalid(
                "students",
                format!(
                    "{} student tensors for {} VID pairs",
                    students.len(),
                    self.pairs.len()
                ),
            ));
        }
        if teachers.len() != self.pairs.len() {
            return Err(VidError::invalid(
                "teachers",
                format!(
                    "{} teacher tensors for {} VID pairs",
                    teachers.len(),
                    self.pairs.len()
                ),
            ));
        }
        self.pairs
            .iter()
            .zip(students.iter().zip(teachers))
            .enumerate()
            .map(|(k, ((vid, _), (s, t)))| {
                if vid.cfg.reduction == Reduction::None {
                    return Err(VidError::invalid(
                        "students",
                        format!("pair {k}: its loss is not reduced (Reduction::None); a distiller needs scalar losses"),
                    ));
                }
                vid.op_inputs(s, t).map_err(|e| match e {
                    VidError::InvalidArgument { arg, message } => VidError::InvalidArgument {
                        arg: if arg == "teacher" { "teachers" } else { "students" },
                        message: format!("pair {k}: `{arg}`: {message}"),
                    },
                    other => other,
                })
            })
            .collect()
    }

    /// Each pair's unweighted loss (for logging); errors as [`VidDistiller::f_forward`].
    pub fn f_forward_each(
        &self,
        students: &[Tensor],
        teachers: &[Tensor],
    ) -> Result<Vec<Tensor>, VidError> {
        let inputs = self.op_inputs(students, teachers)?;
        inputs
            .iter()
            .zip(&self.pairs)
            .map(|(x, (vid, _))| f_vid_loss(&x.mean, &x.target, &x.log_scale, &vid.cfg.options()))
            .collect()
    }

    /// Each pair's unweighted loss (panicking form of [`VidDistiller::f_forward_each`]).
    pub fn forward_each(&self, students: &[Tensor], teachers: &[Tensor]) -> Vec<Tensor> {
        self.f_forward_each(students, teachers)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The weighted sum `sum_k lambda_k * L_k` of the pairs' losses, as one grouped op
    /// ([`crate::f_vid_loss_grouped`]: one pass over all pairs, one autograd node);
    /// `students[k]` and `teachers[k]` go to pair `k`. The loss has the features' dtype when
    /// every pair's is the same, else f32. Returns an error when the counts differ from the
    /// number of pairs (or there is none), or a pair's shapes do not match (the message
    /// names the pair).
    pub fn f_forward(&self, students: &[Tensor], teachers: &[Tensor]) -> Result<Tensor, VidError> {
        if self.pairs.is_empty() {
            return Err(VidError::invalid("self", "the distiller has no VID pair"));
        }
        let inputs = self.op_inputs(students, teachers)?;
        // One grouped op for all pairs (one per distinct set of options, when pairs were
        // pushed with different configs).
        let mut groups: Vec<(VidOptions, Vec<VidTerm<'_>>)> = Vec::new();
        for (x, (vid, lambda)) in inputs.iter().zip(&self.pairs) {
            let term = VidTerm {
                mean: &x.mean,
                target: &x.target,
                log_scale: &x.log_scale,
                weight: *lambda,
            };
            let opts = vid.cfg.options();
            match groups.iter_mut().find(|(o, _)| *o == opts) {
                Some((_, terms)) => terms.push(term),
                None => groups.push((opts, vec![term])),
            }
        }
        let mut total: Option<Tensor> = None;
        for (opts, terms) in &groups {
            let sum = f_vid_loss_grouped(terms, opts)?;
            total = Some(match total {
                None => sum,
                Some(acc) => acc.f_add(&sum)?,
            });
        }
        let total = total.ok_or_else(|| VidError::Internal("no pair".into()))?;
        // The features' dtype when every pair has the same one, as for a single pair.
        let kind = inputs[0].mean.kind();
        if inputs.iter().all(|x| x.mean.kind() == kind) && total.kind() != kind {
            Ok(total.f_to_kind(kind)?)
        } else {
            Ok(total)
        }
    }

    /// The weighted sum of the pairs' losses (panicking form of [`VidDistiller::f_forward`]).
    pub fn forward(&self, students: &[Tensor], teachers: &[Tensor]) -> Tensor {
        self.f_forward(students, teachers)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}
