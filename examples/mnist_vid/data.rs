//! The bundled MNIST subset: loading, the fixed test/validation/pool split, per-class subsets.

use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context};
use flate2::read::GzDecoder;
use tch::Tensor;

/// Test images per class, held out from everything else.
pub const TEST_PER_CLASS: usize = 100;
/// Validation images per class, carved from the training images: settings are chosen on
/// them, never on the test digits. Nothing trains on them.
pub const VAL_PER_CLASS: usize = 50;
/// Training images per class available to teacher and students.
pub const POOL_PER_CLASS: usize = 350;
const CLASSES: usize = 10;
// MNIST's usual normalisation.
pub const PIXEL_MEAN: f32 = 0.1307;
pub const PIXEL_STD: f32 = 0.3081;

/// A small deterministic generator (SplitMix64), independent of libtorch's.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

pub struct Dataset {
    /// `[5000, 1, 28, 28]`, normalised.
    images: Tensor,
    labels: Tensor,
    /// Per class: indices into the train pool tensors (0..3500) of that class.
    pool_by_class: Vec<Vec<i64>>,
    pool: Vec<i64>,
    validation: Vec<i64>,
    test: Vec<i64>,
}

impl Dataset {
    /// Reads the CSV and splits it: per class, a fixed shuffle (seed 0) puts 100 images in
    /// the test set, 50 in the validation set and 350 in the training pool.
    pub fn load(path: &Path) -> anyhow::Result<Dataset> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let reader = BufReader::new(GzDecoder::new(file));
        let mut pixels: Vec<f32> = Vec::with_capacity(5000 * 784);
        let mut labels: Vec<i64> = Vec::with_capacity(5000);
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let vals: Vec<&str> = line.trim().split(',').collect();
            if vals.len() != 785 {
                bail!("line {}: {} values, expected 785", i + 1, vals.len());
            }
            for v in &vals[..784] {
                let p: f32 = v
                    .trim()
                    .parse()
                    .with_context(|| format!("line {}: pixel {v:?}", i + 1))?;
                pixels.push((p / 255.0 - PIXEL_MEAN) / PIXEL_STD);
            }
            let y: i64 = vals[784]
                .trim()
                .parse()
                .with_context(|| format!("line {}: label", i + 1))?;
            if !(0..CLASSES as i64).contains(&y) {
                bail!("line {}: label {y} out of range", i + 1);
            }
            labels.push(y);
        }
        let n = labels.len();
        let mut by_class: Vec<Vec<i64>> = vec![Vec::new(); CLASSES];
        for (i, &y) in labels.iter().enumerate() {
            by_class[y as usize].push(i as i64);
        }
        let mut rng = Rng::new(0);
        let (mut pool, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
        let mut pool_by_class = vec![Vec::new(); CLASSES];
        for (c, idx) in by_class.iter_mut().enumerate() {
            let need = TEST_PER_CLASS + VAL_PER_CLASS + POOL_PER_CLASS;
            if idx.len() < need {
                bail!("class {c}: {} images, need {need}", idx.len());
            }
            rng.shuffle(idx);
            let (held_out, train) = idx.split_at(TEST_PER_CLASS);
            test.extend_from_slice(held_out);
            validation.extend_from_slice(&train[..VAL_PER_CLASS]);
            for &i in &train[VAL_PER_CLASS..VAL_PER_CLASS + POOL_PER_CLASS] {
                pool_by_class[c].push(pool.len() as i64);
                pool.push(i);
            }
        }
        Ok(Dataset {
            images: Tensor::from_slice(&pixels).view([n as i64, 1, 28, 28]),
            labels: Tensor::from_slice(&labels),
            pool_by_class,
            pool,
            validation,
            test,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }
    pub fn train_pool_len(&self) -> usize {
        self.pool.len()
    }
    pub fn validation_len(&self) -> usize {
        self.validation.len()
    }
    pub fn test_len(&self) -> usize {
        self.test.len()
    }

    fn take(&self, idx: &[i64]) -> (Tensor, Tensor) {
        let i = Tensor::from_slice(idx);
        (
            self.images.index_select(0, &i),
            self.labels.index_select(0, &i),
        )
    }

    /// The 3,500-image training pool (images, labels), class-balanced.
    pub fn train_pool(&self) -> (Tensor, Tensor) {
        self.take(&self.pool)
    }

    /// The 500 validation images.
    pub fn validation(&self) -> (Tensor, Tensor) {
        self.take(&self.validation)
    }

    /// The 1,000 held-out test images.
    pub fn test(&self) -> (Tensor, Tensor) {
        self.take(&self.test)
    }

    /// `m` random images per class, as indices into the training pool.
    pub fn subset(&self, m: i64, rng: &mut Rng) -> Vec<i64> {
        let mut out = Vec::new();
        for idx in &self.pool_by_class {
            let mut idx = idx.clone();
            rng.shuffle(&mut idx);
            out.extend_from_slice(&idx[..m as usize]);
        }
        out
    }
}
