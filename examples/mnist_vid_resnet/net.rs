//! Pre-activation residual networks (He et al., "Identity Mappings in Deep Residual
//! Networks", 2016) for 28x28 digits: a 3x3 stem, three stages of one pre-activation basic
//! block (stride 1, 2, 2), then batch norm, ReLU, global average pooling and a linear head.
//! The transfer points are the stage outputs, the residual stream before any batch norm or
//! ReLU (as RepDistiller's WRN features).

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// Channels of the teacher's three stages.
pub const TEACHER_WIDTHS: [i64; 3] = [32, 64, 128];
/// Channels of the student's three stages.
pub const STUDENT_WIDTHS: [i64; 3] = [8, 16, 32];
const CLASSES: i64 = 10;

fn conv(vs: nn::Path, from: i64, to: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        // Batch norm follows every convolution but the last of a block, whose output is
        // added to the stream: no bias anywhere, as the reference ResNets.
        bias: false,
        ..Default::default()
    };
    nn::conv2d(vs, from, to, kernel, config)
}

/// BN, ReLU, conv3x3 (stride), BN, ReLU, conv3x3, plus the input (through a 1x1 projection
/// of the pre-activated input when the shape changes).
struct PreActBlock {
    bn1: nn::BatchNorm,
    conv1: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv2: nn::Conv2D,
    projection: Option<nn::Conv2D>,
}

impl PreActBlock {
    fn new(vs: nn::Path, from: i64, to: i64, stride: i64) -> PreActBlock {
        PreActBlock {
            bn1: nn::batch_norm2d(&vs / "bn1", from, Default::default()),
            conv1: conv(&vs / "conv1", from, to, 3, stride),
            bn2: nn::batch_norm2d(&vs / "bn2", to, Default::default()),
            conv2: conv(&vs / "conv2", to, to, 3, 1),
            projection: (stride != 1 || from != to)
                .then(|| conv(&vs / "projection", from, to, 1, stride)),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let pre = self.bn1.forward_t(x, train).relu();
        let skip = match &self.projection {
            Some(p) => pre.apply(p),
            None => x.shallow_clone(),
        };
        let h = pre.apply(&self.conv1);
        self.bn2.forward_t(&h, train).relu().apply(&self.conv2) + skip
    }
}

/// A network's three stage outputs and its logits.
pub struct Features {
    pub stages: Vec<Tensor>,
    pub logits: Tensor,
}

impl Features {
    /// The last stage's output, the head's input.
    pub fn last_stage(&self) -> &Tensor {
        &self.stages[self.stages.len() - 1]
    }

    /// New handles to the same tensors, for another thread.
    pub fn share(&self) -> Features {
        Features {
            stages: self.stages.iter().map(Tensor::shallow_clone).collect(),
            logits: self.logits.shallow_clone(),
        }
    }

    /// The rows `idx` of every stage output.
    pub fn stage_rows(&self, idx: &Tensor) -> Vec<Tensor> {
        self.stages.iter().map(|s| s.index_select(0, idx)).collect()
    }

    /// Concatenates along the batch.
    pub fn cat(parts: &[Features]) -> Features {
        let stages = (0..parts[0].stages.len())
            .map(|l| Tensor::cat(&parts.iter().map(|p| &p.stages[l]).collect::<Vec<_>>(), 0))
            .collect();
        let logits = Tensor::cat(&parts.iter().map(|p| &p.logits).collect::<Vec<_>>(), 0);
        Features { stages, logits }
    }
}

/// A pre-activation ResNet with one block per stage.
pub struct ResNet {
    stem: nn::Conv2D,
    blocks: Vec<PreActBlock>,
    bn: nn::BatchNorm,
    head: nn::Linear,
}

impl ResNet {
    /// Stage channels `widths`; parameters under `vs`.
    pub fn new(vs: &nn::Path, widths: [i64; 3]) -> ResNet {
        let mut from = widths[0];
        let blocks = widths
            .iter()
            .enumerate()
            .map(|(k, &to)| {
                let block = PreActBlock::new(
                    vs / format!("stage{}", k + 1),
                    from,
                    to,
                    k.min(1) as i64 + 1,
                );
                from = to;
                block
            })
            .collect();
        ResNet {
            stem: conv(vs / "stem", 1, widths[0], 3, 1),
            blocks,
            bn: nn::batch_norm2d(vs / "bn", widths[2], Default::default()),
            head: nn::linear(vs / "head", widths[2], CLASSES, Default::default()),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Features {
        let mut h = x.apply(&self.stem);
        let mut stages = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            h = block.forward_t(&h, train);
            stages.push(h.shallow_clone());
        }
        let logits = self.pooled(&h, train).apply(&self.head);
        Features { stages, logits }
    }

    /// The head's input: batch norm, ReLU and global average pooling of the last stage.
    pub fn pooled(&self, last_stage: &Tensor, train: bool) -> Tensor {
        self.bn
            .forward_t(last_stage, train)
            .relu()
            .mean_dim(&[2i64, 3][..], false, Kind::Float)
    }
}
