//! One optimisation step and its bookkeeping: a batch onto the device
//! ([`Stepper::upload`], through pinned memory on CUDA), forward, losses,
//! backward, the gradients' all-reduce, clipping and AdamW
//! ([`Stepper::step`], which reads nothing back), and [`flush`], which
//! reads the losses of the steps since the last one back at once and makes
//! them `metrics.jsonl` lines.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::TrainConfig;
use crate::dist::Dist;
use crate::error::{Result, TrainError};
use crate::loss::losses;
use crate::model::{Cae2, Pass};
use crate::optim::{AdamW, cosine_lr};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    /// Steps completed.
    pub step: u64,
    /// Epoch of the step.
    pub epoch: u64,
    /// Optimised loss.
    pub loss: f64,
    /// Mean `l_v` per token.
    pub loss_v: f64,
    /// Mean `l_z` per token.
    pub loss_z: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Images per second (of all ranks together) over the steps whose
    /// losses were read back together (`--metrics-every`).
    pub images_per_sec: f64,
    /// Model TFLOP/s over the same steps, all ranks together
    /// ([`ModelConfig::train_flops_per_image`]).
    #[serde(default)]
    pub tflops: f64,
    /// Model FLOPs utilisation: `tflops` over the devices' peak, when the
    /// peak is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
}

/// Everything one optimisation step needs besides the batch.
pub(crate) struct Stepper<'a> {
    pub(crate) cfg: &'a TrainConfig,
    pub(crate) model: &'a Cae2,
    pub(crate) dist: &'a Dist,
    pub(crate) device: tch::Device,
    pub(crate) autocast: bool,
    /// This process's rows of every global batch.
    pub(crate) rows: std::ops::Range<usize>,
    /// Patches per side of the student.
    pub(crate) grid: usize,
    /// The teacher's grid, when targets must be mapped to the student's.
    pub(crate) teacher_grid: (usize, usize),
    pub(crate) dim: i64,
    /// Reconstruction of a `pca` store's targets on the device.
    pub(crate) target_map: Option<crate::loader::TargetMap>,
}

impl Stepper<'_> {
    /// Samples this process trains per step.
    pub(crate) fn local_batch(&self) -> usize {
        self.rows.len()
    }

    /// The batch on the device: images, visible and masked positions, and
    /// the targets as `[B, 1 + grid^2, D]` (read from the store, or computed
    /// by the live teacher). On CUDA the copies go through pinned host memory
    /// and do not block, so the next batch is queued while the GPU still
    /// works on this one.
    pub(crate) fn upload(&self, batch: crate::loader::Batch, teacher: Option<&mut teacher::Teacher>) -> Result<DeviceBatch> {
        let (b, s) = (self.local_batch() as i64, self.cfg.model.image_size);
        let np = (self.grid * self.grid) as i64;
        let nm = self.cfg.num_masked as i64;
        let tokens = 1 + np;
        let mapped: Vec<f32>;
        let stored = teacher.is_none();
        let targets: &[f32] = match teacher {
            Some(t) => {
                let out = t.forward(&batch.teacher_inputs, b as usize)?;
                let per = out.len() / b as usize;
                let student = (self.grid, self.grid);
                mapped = if self.teacher_grid == student {
                    out
                } else {
                    out.chunks(per)
                        .flat_map(|c| shard_store::resample_grid(c, self.dim as usize, true, self.teacher_grid, student))
                        .collect()
                };
                &mapped
            }
            None => &batch.targets,
        };
        let device = self.device;
        Ok(DeviceBatch {
            epoch: batch.epoch,
            images: upload(&batch.images, &[b, 3, s, s], device),
            visible: upload(&batch.visible, &[b, np - nm], device),
            masked: upload(&batch.masked, &[b, nm], device),
            targets: match (&self.target_map, stored) {
                (Some(map), true) => map.apply(&upload(targets, &[b, tokens, self.dim], device)),
                _ => upload(targets, &[b, tokens, self.dim], device),
            },
        })
    }

    /// Forward, losses, backward, the gradients' all-reduce, clipping and
    /// the AdamW update of `step`, without reading anything back: the
    /// losses and the gradient norm stay on the device until the next
    /// [`flush`].
    pub(crate) fn step(&self, step: u64, batch: &DeviceBatch, opt: &mut AdamW) -> Result<Pending> {
        let cfg = self.cfg;
        let dim = self.dim;
        let np = (self.grid * self.grid) as i64;
        let DeviceBatch { images, visible, masked, targets, .. } = batch;

        tch::manual_seed((cfg.seed as i64).wrapping_add(step as i64 + 1));
        opt.zero_grad();
        let pass = Pass::Train { global: cfg.batch as i64, offset: self.rows.start as i64 };
        let out = tch::autocast(self.autocast, || self.model.forward(images, visible, masked, pass));
        let out = crate::model::Output { visible: out.visible.to_kind(Kind::Float), masked: out.masked.to_kind(Kind::Float) };
        let patches = targets.narrow(1, 1, np);
        let target_v =
            Tensor::cat(&[targets.narrow(1, 0, 1), patches.gather(1, &visible.unsqueeze(-1).expand([-1, -1, dim], false), false)], 1);
        let target_z = patches.gather(1, &masked.unsqueeze(-1).expand([-1, -1, dim], false), false);
        let l = losses(&out.visible, &target_v, &out.masked, &target_z, &cfg.loss);
        l.total.backward();
        // every rank's slice has the same number of tokens, so the mean of
        // the ranks' mean gradients is the global batch's
        self.dist.average_gradients(&opt.grads())?;
        let grad_norm = opt.clip_grad_norm(cfg.clip_grad)?.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, self.device)));
        let lr = cosine_lr(step as i64, cfg.steps as i64, cfg.warmup_steps as i64, cfg.lr, cfg.min_lr);
        opt.step(lr)?;
        let values = Tensor::stack(&[l.total.detach().to_kind(Kind::Float), l.visible, l.masked, grad_norm], 0);
        Ok(Pending { step: step + 1, epoch: batch.epoch, lr, values })
    }
}

/// `data` as a tensor of `shape` on `device`. On CUDA it is copied once,
/// straight into pinned (page-locked) host memory, and sent with a
/// non-blocking transfer, so the host goes on while the GPU works; elsewhere
/// it is one copy into a new tensor.
///
/// # Panics
/// If `data` does not hold `shape`'s number of values (the loader builds
/// both from the same sizes).
fn upload<T: tch::kind::Element>(data: &[T], shape: &[i64], device: tch::Device) -> Tensor {
    assert_eq!(data.len() as i64, shape.iter().product::<i64>(), "batch buffer does not match its shape");
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: `borrowed` views `data` (contiguous, `shape`'s size, checked
    // above) without owning it; it is read only by the host-to-host copy
    // below, which completes before `copy_` returns, and dropped right after,
    // while `data` is still borrowed.
    let borrowed = unsafe { Tensor::from_blob(data.as_ptr().cast(), shape, &strides, T::KIND, tch::Device::Cpu) };
    let mut host = Tensor::empty(shape, (T::KIND, tch::Device::Cpu));
    if device.is_cuda() {
        host = host.pin_memory(device);
    }
    host.copy_(&borrowed);
    drop(borrowed);
    if device.is_cuda() { host.to_device_(device, T::KIND, true, false) } else { host }
}

/// A batch on the training device.
pub(crate) struct DeviceBatch {
    epoch: u64,
    images: Tensor,
    visible: Tensor,
    masked: Tensor,
    targets: Tensor,
}

/// A step whose losses are still on the device.
pub(crate) struct Pending {
    step: u64,
    epoch: u64,
    lr: f64,
    /// `[loss, l_v, l_z, grad_norm]` of this rank (the norm is global).
    values: Tensor,
}

/// Read the pending steps' values back (one host sync), average the losses
/// over the ranks (one collective), and turn them into metrics; speed and
/// FLOPs are over the `elapsed` time the steps took. The first step whose
/// loss is not finite is an error.
pub(crate) fn flush(
    pending: &mut Vec<Pending>,
    dist: &Dist,
    batch: usize,
    flops_per_step: f64,
    peak: Option<f64>,
    elapsed: Duration,
) -> Result<Vec<Metrics>> {
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Tensor> = pending.iter().map(|p| p.values.shallow_clone()).collect();
    let host = Tensor::stack(&rows, 0).to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let values: Vec<f64> = Vec::<f64>::try_from(host.flatten(0, -1))?;
    // the ranks' mean (one process: its own values, divided by 1 exactly)
    let local: Vec<f64> = values.chunks_exact(4).flat_map(|v| [v[0], v[1], v[2]]).collect();
    let world = dist.world as f64;
    let losses: Vec<f64> = dist.sum(&local)?.into_iter().map(|x| x / world).collect();
    let n = pending.len() as f64;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let images_per_sec = batch as f64 * n / secs;
    let tflops = flops_per_step * n / secs / 1e12;
    let mut out = Vec::with_capacity(pending.len());
    for (i, p) in pending.drain(..).enumerate() {
        let (loss, loss_v, loss_z) = (losses[3 * i], losses[3 * i + 1], losses[3 * i + 2]);
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step: p.step, loss });
        }
        out.push(Metrics {
            step: p.step,
            epoch: p.epoch,
            loss,
            loss_v,
            loss_z,
            lr: p.lr,
            grad_norm: values[4 * i + 3],
            images_per_sec,
            tflops,
            mfu: peak.map(|pk| tflops / (pk * dist.world as f64)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host copy of a batch buffer keeps its values and shape (on CUDA the
    /// same copy lands in pinned memory first).
    #[test]
    fn upload_copies_values_into_the_shape() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let t = upload(&data, &[2, 3, 4], tch::Device::Cpu);
        assert_eq!(t.size(), [2, 3, 4]);
        assert_eq!(t.double_value(&[1, 2, 3]), 11.5);
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).expect("values"), data);
        let ids: Vec<i64> = vec![7, 8, 9, 10, 11, 12];
        let t = upload(&ids, &[3, 2], tch::Device::Cpu);
        assert_eq!((t.kind(), t.int64_value(&[2, 0])), (Kind::Int64, 11));
    }
}
