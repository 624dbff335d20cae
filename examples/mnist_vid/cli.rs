//! Command-line settings both MNIST experiments share (flattened into each one's `Args`),
//! and the parsing that goes with them.

use std::path::PathBuf;

use anyhow::bail;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Common {
    /// The MNIST CSV (gzip): 785 integers a line, 784 pixels then the label.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist_5k.csv.gz"))]
    pub data: PathBuf,

    /// Where to write the results [default: results/ of the crate; target/<example>_quick
    /// with --quick].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Where to train: auto (a CUDA GPU when libtorch sees one, else the CPU), cpu, cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// SGD learning rate of networks, hints and regressors, before the schedule's decay.
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,

    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,

    /// Weight decay of every parameter but the VID variance.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,

    /// KD temperature.
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,

    /// FitNet hint weight (the reference implementations' 100).
    #[arg(long, default_value_t = 100.0)]
    pub fitnet_weight: f64,

    /// Attention-transfer weight (the reference implementations' 1000).
    #[arg(long, default_value_t = 1000.0)]
    pub at_weight: f64,

    /// NST weight (the reference implementations' 50).
    #[arg(long, default_value_t = 50.0)]
    pub nst_weight: f64,

    /// VID weight lambda per layer pair (the reference implementations' 1.0).
    #[arg(long, default_value_t = 1.0)]
    pub vid_lambda: f64,

    /// Runs trained at once, one thread each [default: the CPU count; 1 on a GPU].
    #[arg(long)]
    pub jobs: Option<usize>,
}

impl Common {
    /// The device `--device` names, or why it cannot be had.
    pub fn device(&self) -> anyhow::Result<Device> {
        Ok(match self.device.as_str() {
            "auto" => Device::cuda_if_available(),
            "cpu" => Device::Cpu,
            "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
            "cuda" => bail!("--device cuda: libtorch sees no CUDA GPU (none here, no driver, or a CPU build of libtorch)"),
            other => bail!("--device {other:?}: expected auto, cpu or cuda"),
        })
    }

    /// `--out`, or results/ of the crate (target/`example`_quick with --quick).
    pub fn out_dir(&self, example: &str, quick: bool) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            if quick {
                root.join("target").join(format!("{example}_quick"))
            } else {
                root.join("results")
            }
        })
    }

    /// `--jobs`, or one run per core on the CPU and one at a time on a GPU.
    pub fn jobs(&self, device: Device) -> usize {
        self.jobs.unwrap_or(if device.is_cuda() {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        })
    }
}

/// Parses a comma-separated list given on the command line.
pub fn parse_list<T: std::str::FromStr<Err = String>>(items: &[String]) -> anyhow::Result<Vec<T>> {
    items
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)
}
