//! AdamW with decoupled weight decay and per-parameter decay groups, global
//! gradient-norm clipping, and the warmup + cosine schedule of the BEiT/CAE
//! code. Held here (rather than `tch::nn::AdamW`) so the moments can be
//! checkpointed and restored exactly.
//!
//! The update is ATen's fused AdamW (`_fused_adamw_`: one multi-tensor
//! kernel per decay group, on CPU and CUDA) and clipping uses `_foreach_norm`
//! and `_foreach_mul_` by a device-side factor, so neither reads a value back
//! to the host: `src/optim.cpp` binds them, as tch does not.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void};

use tch::{Kind, Tensor};

unsafe extern "C" {
    fn caev2_fused_adamw(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        m: *mut *mut c_void,
        v: *mut *mut c_void,
        n: usize,
        step: *mut c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn caev2_clip_grad_norm(grads: *mut *mut c_void, n: usize, max: f64, norm: *mut *mut c_void, err: *mut c_char, len: usize) -> c_int;
}

/// An error from the C++ side, as a libtorch error.
fn torch_error(buf: &[u8]) -> tch::TchError {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    tch::TchError::Torch(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// tch's C tensor pointers (`at::Tensor*`) of `ts`, for the shim.
fn pointers(ts: &mut [Tensor]) -> Vec<*mut c_void> {
    ts.iter_mut().map(|t| t.as_mut_ptr().cast()).collect()
}

/// Optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// `beta1`.
    pub beta1: f64,
    /// `beta2` (0.999 in the released scripts, 0.98 in the paper).
    pub beta2: f64,
    /// `eps`.
    pub eps: f64,
    /// Weight decay for parameters in the decay group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The released scripts': (0.9, 0.999), eps 1e-8, weight decay 0.05.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 }
    }
}

/// One parameter with its moments.
#[derive(Debug)]
struct Slot {
    param: Tensor,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named parameters.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    step: i64,
}

impl AdamW {
    /// An optimiser over `params` (`name -> tensor`); `decay(name, t)` says
    /// whether weight decay applies.
    pub fn new(cfg: AdamWConfig, params: impl IntoIterator<Item = (String, Tensor)>, decay: impl Fn(&str, &Tensor) -> bool) -> Self {
        let slots = params
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, t)| {
                let d = decay(&name, &t);
                (name, Slot { m: t.zeros_like(), v: t.zeros_like(), param: t, decay: d })
            })
            .collect();
        Self { cfg, slots, step: 0 }
    }

    /// Names of the parameters with and without weight decay.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let decay = self.slots.iter().filter(|(_, s)| s.decay).map(|(n, _)| n.as_str()).collect();
        let no = self.slots.iter().filter(|(_, s)| !s.decay).map(|(n, _)| n.as_str()).collect();
        (decay, no)
    }

    /// Steps taken.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// The defined gradients, in parameter-name order (the same on every
    /// data-parallel rank).
    pub fn grads(&self) -> Vec<Tensor> {
        self.slots.values().map(|s| s.param.grad()).filter(Tensor::defined).collect()
    }

    /// Set the step count (a data-parallel rank that received rank 0's
    /// restored moments).
    pub fn set_steps(&mut self, steps: i64) {
        self.step = steps;
    }

    /// Zero all gradients.
    pub fn zero_grad(&mut self) {
        for s in self.slots.values_mut() {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Scale gradients so their global L2 norm is at most `max` (timm's
    /// `clip_grad_norm_`), without a host sync: returns the norm before
    /// clipping as a scalar tensor on the parameters' device (`None` without
    /// gradients).
    ///
    /// # Errors
    /// A libtorch error.
    pub fn clip_grad_norm(&mut self, max: f64) -> Result<Option<Tensor>, tch::TchError> {
        let mut grads = self.grads();
        if grads.is_empty() {
            return Ok(None);
        }
        let mut g = pointers(&mut grads);
        let mut norm: *mut c_void = std::ptr::null_mut();
        let mut err = vec![0u8; 1024];
        // SAFETY: live tensors and their count, an out pointer the shim
        // fills with a new at::Tensor on success, a buffer of the length
        // passed; the shim catches every C++ exception.
        let rc = unsafe { caev2_clip_grad_norm(g.as_mut_ptr(), g.len(), max, &mut norm, err.as_mut_ptr().cast(), err.len()) };
        if rc != 0 || norm.is_null() {
            return Err(torch_error(&err));
        }
        // SAFETY: a tensor the shim allocated for us, owned from here on.
        Ok(Some(unsafe { Tensor::from_ptr(norm.cast()) }))
    }

    /// One AdamW step at learning rate `lr`: ATen's fused kernel, once for
    /// the parameters with weight decay and once for those without.
    ///
    /// # Errors
    /// A libtorch error.
    pub fn step(&mut self, lr: f64) -> Result<(), tch::TchError> {
        self.step += 1;
        let c = self.cfg;
        for decay in [true, false] {
            let (mut p, mut g, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for s in self.slots.values().filter(|s| s.decay == decay) {
                let grad = s.param.grad();
                if grad.defined() {
                    p.push(s.param.shallow_clone());
                    g.push(grad);
                    m.push(s.m.shallow_clone());
                    v.push(s.v.shallow_clone());
                }
            }
            if p.is_empty() {
                continue;
            }
            let mut step = Tensor::full([] as [i64; 0], self.step as f64, (Kind::Float, p[0].device()));
            let wd = if decay { c.weight_decay } else { 0.0 };
            let (mut pp, mut gp, mut mp, mut vp) = (pointers(&mut p), pointers(&mut g), pointers(&mut m), pointers(&mut v));
            let mut err = vec![0u8; 1024];
            // SAFETY: four lists of the same length of live tensors, a live
            // step tensor, a buffer of the length passed; the shim catches
            // every C++ exception.
            let rc = unsafe {
                caev2_fused_adamw(
                    pp.as_mut_ptr(),
                    gp.as_mut_ptr(),
                    mp.as_mut_ptr(),
                    vp.as_mut_ptr(),
                    pp.len(),
                    step.as_mut_ptr().cast(),
                    lr,
                    c.beta1,
                    c.beta2,
                    wd,
                    c.eps,
                    err.as_mut_ptr().cast(),
                    err.len(),
                )
            };
            if rc != 0 {
                return Err(torch_error(&err));
            }
        }
        Ok(())
    }

    /// The step the fused kernel replaced, written out with tensor ops:
    /// the reference the fused step is tested against.
    #[cfg(test)]
    fn step_reference(&mut self, lr: f64) {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for s in self.slots.values_mut() {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                if s.decay && c.weight_decay != 0.0 {
                    let _ = s.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = s.m.g_mul_scalar_(c.beta1);
                let _ = s.m.g_add_(&(&g * (1.0 - c.beta1)));
                let _ = s.v.g_mul_scalar_(c.beta2);
                let _ = s.v.g_add_(&(&g * &g * (1.0 - c.beta2)));
                let denom = (&s.v / bc2).sqrt() + c.eps;
                let upd = &s.m / &denom * (lr / bc1);
                let _ = s.param.g_sub_(&upd);
            }
        });
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots.iter().flat_map(|(n, s)| [(format!("m.{n}"), s.m.shallow_clone()), (format!("v.{n}"), s.v.shallow_clone())]).collect()
    }

    /// Restore moments and the step count.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor, named.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: i64) -> Result<(), String> {
        for (n, s) in self.slots.iter_mut() {
            for (prefix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{n}");
                let src = tensors.get(&key).ok_or_else(|| format!("optimizer state has no {key}"))?;
                if src.size() != dst.size() {
                    return Err(format!("{key}: shape {:?}, expected {:?}", src.size(), dst.size()));
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// BEiT/CAE `cosine_scheduler`: linear warmup from 0 to `base` over
/// `warmup` steps (`linspace(0, base, warmup)`), then
/// `min + (base - min) * (1 + cos(pi * i / (total - warmup))) / 2`.
pub fn cosine_lr(step: i64, total: i64, warmup: i64, base: f64, min: f64) -> f64 {
    if step < warmup {
        return if warmup == 1 { base } else { base * step as f64 / (warmup - 1) as f64 };
    }
    let n = (total - warmup).max(1) as f64;
    let i = (step - warmup) as f64;
    min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * i / n).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_values_at_known_steps() {
        let lr = |s| cosine_lr(s, 110, 11, 1e-3, 1e-5);
        assert_eq!(lr(0), 0.0);
        assert!((lr(5) - 0.5e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12, "end of warmup reaches the peak");
        assert!((lr(11) - 1e-3).abs() < 1e-12, "cosine starts at the peak");
        assert!((lr(11 + 99 / 2) - (1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (std::f64::consts::PI * 49.0 / 99.0).cos()))).abs() < 1e-12);
        assert!((lr(110) - 1e-5).abs() < 1e-9, "ends at the minimum");
    }

    /// One step against the closed form of AdamW on a scalar.
    #[test]
    fn adamw_step_matches_the_formula_and_groups_split() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]).reshape([1, 2]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
        let mut opt = AdamW::new(cfg, [("w".to_string(), w.shallow_clone()), ("b".to_string(), b.shallow_clone())], |_, t| t.dim() >= 2);
        assert_eq!(opt.groups(), (vec!["w"], vec!["b"]));
        let loss = (&w * 3.0).sum(Kind::Float) + (&b * 2.0).sum(Kind::Float);
        loss.backward();
        opt.step(0.1).expect("step");
        // first step: m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps) = lr * sign(g)
        let w1 = 1.0 * (1.0 - 0.1 * 0.05) - 0.1;
        assert!((w.double_value(&[0, 0]) - w1).abs() < 1e-6);
        assert!((b.double_value(&[0]) - (0.5 - 0.1)).abs() < 1e-6, "no decay on biases");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let w = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(
            AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            [("w".to_string(), w.shallow_clone())],
            |_, _| false,
        );
        (&w * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let before = opt.clip_grad_norm(1.0).expect("clip").expect("gradients").double_value(&[]);
        assert!((before - 5.0).abs() < 1e-5);
        assert!((w.grad().norm().double_value(&[]) - 1.0).abs() < 1e-4);
    }

    /// The fused step equals the written-out AdamW within 1e-6 (relative,
    /// per tensor) over 30 steps of a small regression with both decay
    /// groups, clipping on, and gradients that change every step.
    #[test]
    fn fused_step_equals_the_written_out_one() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
        let init = |seed: i64| {
            tch::manual_seed(seed);
            let w = (Tensor::randn([16, 8], (Kind::Float, tch::Device::Cpu)) * 0.3).set_requires_grad(true);
            let b = Tensor::zeros([8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            let opt = AdamW::new(cfg, [("w".to_string(), w.shallow_clone()), ("b".to_string(), b.shallow_clone())], |_, t| t.dim() >= 2);
            (w, b, opt)
        };
        let (wf, bf, mut fused) = init(3);
        let (wr, br, mut reference) = init(3);
        for step in 0..30 {
            tch::manual_seed(100 + step);
            let x = Tensor::randn([32, 16], (Kind::Float, tch::Device::Cpu));
            let y = Tensor::randn([32, 8], (Kind::Float, tch::Device::Cpu));
            let lr = cosine_lr(step, 30, 5, 1e-2, 1e-4);
            for (w, b, opt, fused_step) in [(&wf, &bf, &mut fused, true), (&wr, &br, &mut reference, false)] {
                opt.zero_grad();
                (x.matmul(w) + b - &y).square().mean(Kind::Float).backward();
                opt.clip_grad_norm(0.5).expect("clip");
                if fused_step { opt.step(lr).expect("step") } else { opt.step_reference(lr) }
            }
        }
        for (a, b) in [(&wf, &wr), (&bf, &br)] {
            let rel = (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
            assert!(rel < 1e-6, "fused and written-out AdamW differ by {rel:e} (relative)");
        }
        for ((na, a), (_, b)) in fused.state().iter().zip(reference.state().iter()) {
            let rel = (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30);
            assert!(rel < 1e-6, "{na}: moments differ by {rel:e}");
        }
    }
}
