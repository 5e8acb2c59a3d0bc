//! AdamW with weight-decay groups, the cosine schedule, and global-norm gradient clipping.
//!
//! The optimizer is written on tensors here, rather than taken from tch, because its state
//! (moments and step count) must go into checkpoints for an exact resume.

use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::path::Path;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

/// Linear warm-up to `lr`, then cosine decay to `lr * min_ratio` at `total` steps.
pub fn cosine_lr(step: u64, total: u64, warmup: u64, lr: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    lr * (min_ratio + (1.0 - min_ratio) * cosine)
}

struct Param {
    name: String,
    tensor: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub steps: i64,
    /// Step and clip with libtorch's multi-tensor kernels (`fused`, the default) or with one
    /// tensor operation at a time (the plain path they are tested and benchmarked against).
    pub fused: bool,
}

extern "C" {
    fn sipt_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sipt_clip_grad_norm(
        grads: *const *mut C_tensor,
        n: usize,
        max_norm: f64,
        norm: *mut f64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Run a shim call that returns 0 or fills `err`.
fn shim(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), String> {
    let mut err = [0 as c_char; 512];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim leaves a NUL-terminated message in `err` when it fails.
    Err(unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// Warn once that a fused kernel failed and the plain path takes over for good.
fn unfused(what: &str, err: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!("libtorch's fused {what} failed ({err}); using the plain optimizer")
    });
}

impl AdamW {
    /// Matrices (≥ 2 dims) decay; norms and other vectors do not (decaying a norm's gain
    /// towards zero fights the normalisation).
    pub fn new(named: Vec<(String, Tensor)>, beta1: f64, beta2: f64, weight_decay: f64) -> AdamW {
        let mut named = named;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, tensor)| Param {
                decay: tensor.dim() >= 2,
                m: tensor.zeros_like(),
                v: tensor.zeros_like(),
                name,
                tensor,
            })
            .collect();
        AdamW {
            params,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
            steps: 0,
            fused: true,
        }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Scale gradients so their global norm is at most `max_norm` (0 = no clipping); returns
    /// the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.tensor.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        if self.fused {
            let handles: Vec<*mut C_tensor> = grads.iter().map(|g| g.as_ptr() as *mut _).collect();
            let mut norm = 0.0f64;
            // SAFETY: the handles stay alive (in `grads`) for the call; the shim reads them and
            // scales the tensors in place.
            let done = shim(|err, len| unsafe {
                sipt_clip_grad_norm(
                    handles.as_ptr(),
                    handles.len(),
                    max_norm,
                    &mut norm,
                    err,
                    len,
                )
            });
            match done {
                Ok(()) => return norm,
                Err(e) => {
                    unfused("gradient norm", &e);
                    self.fused = false;
                }
            }
        }
        Self::clip_plain(grads, max_norm)
    }

    /// Clipping one tensor operation at a time.
    fn clip_plain(grads: Vec<Tensor>, max_norm: f64) -> f64 {
        let norm = tch::no_grad(|| {
            let squares: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float))
                .collect();
            Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
        });
        let total = norm.double_value(&[]);
        if max_norm > 0.0 && total > max_norm {
            let scale = max_norm / (total + 1e-6);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(scale);
                }
            });
        }
        total
    }

    /// One AdamW step at `lr` for every parameter that has a gradient: with libtorch's fused
    /// kernel (`_fused_adamw_`, one pass over each parameter, its gradient and moments) per
    /// group of the same type, device and decay, or one tensor operation at a time when
    /// `fused` is off or the kernel refuses a group (before it changes anything).
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let mut groups: Vec<((Kind, tch::Device, bool), Vec<usize>)> = Vec::new();
        let mut grads = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let g = p.tensor.grad();
            if g.defined() {
                let key = (p.tensor.kind(), p.tensor.device(), p.decay);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, members)) => members.push(i),
                    None => groups.push((key, vec![i])),
                }
            }
            grads.push(g);
        }
        for ((_, device, decay), members) in &groups {
            if self.fused {
                match self.step_fused(lr, *device, *decay, members, &grads) {
                    Ok(()) => continue,
                    Err(e) => {
                        unfused("AdamW step", &e);
                        self.fused = false;
                    }
                }
            }
            for &i in members {
                self.step_plain(i, &grads[i], lr);
            }
        }
    }

    /// The fused kernel over parameters `members` (one device, one decay).
    fn step_fused(
        &self,
        lr: f64,
        device: tch::Device,
        decay: bool,
        members: &[usize],
        grads: &[Tensor],
    ) -> Result<(), String> {
        // The kernel reads each parameter's step count (this step included) from a tensor.
        let count = Tensor::from(self.steps as f32).to_device(device);
        let ptrs = |f: &dyn Fn(usize) -> *mut C_tensor| -> Vec<*mut C_tensor> {
            members.iter().map(|&i| f(i)).collect()
        };
        let params = ptrs(&|i| self.params[i].tensor.as_ptr() as *mut _);
        let g = ptrs(&|i| grads[i].as_ptr() as *mut _);
        let m = ptrs(&|i| self.params[i].m.as_ptr() as *mut _);
        let v = ptrs(&|i| self.params[i].v.as_ptr() as *mut _);
        let counts = ptrs(&|_| count.as_ptr() as *mut _);
        let decay = if decay { self.weight_decay } else { 0.0 };
        // SAFETY: every handle stays alive for the call (parameters and moments in
        // `self.params`, gradients in `grads`, the count here); the kernel updates the
        // parameters and moments in place and only reads the rest.
        shim(|err, len| unsafe {
            sipt_fused_adamw(
                params.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                counts.as_ptr(),
                members.len(),
                lr,
                self.beta1,
                self.beta2,
                decay,
                self.eps,
                err,
                len,
            )
        })
    }

    /// Parameter `i`'s step one tensor operation at a time.
    fn step_plain(&mut self, i: usize, g: &Tensor, lr: f64) {
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(self.steps as i32);
        let bias2 = 1.0 - b2.powi(self.steps as i32);
        let (eps, weight_decay) = (self.eps, self.weight_decay);
        let p = &mut self.params[i];
        tch::no_grad(|| {
            if p.decay && weight_decay > 0.0 {
                let _ = p.tensor.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            // In place where libtorch has the fused form (3 temporaries, not 8): every rank of
            // a data-parallel job repeats this step, so its cost does not shrink.
            // m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g²
            let _ = p.m.lerp_(g, 1.0 - b1);
            let _ = p.v.g_mul_scalar_(b2).addcmul_(g, &(g * (1.0 - b2)));
            // x -= lr / bias1 · m / (sqrt(v) / sqrt(bias2) + eps)
            let mut denom = p.v.sqrt();
            let _ = denom.g_div_scalar_(bias2.sqrt()).g_add_scalar_(eps);
            let _ = p.tensor.addcdiv_(&(&p.m * (-lr / bias1)), &denom);
        });
    }

    /// Moments and step count, for a checkpoint.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            named.push((format!("m.{}", p.name), p.m.to_device(tch::Device::Cpu)));
            named.push((format!("v.{}", p.name), p.v.to_device(tch::Device::Cpu)));
        }
        named.push(("steps".into(), Tensor::from_slice(&[self.steps])));
        Tensor::write_safetensors(&named, path)
            .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?
            .into_iter()
            .collect();
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                for (prefix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                    let key = format!("{prefix}.{}", p.name);
                    let src = tensors
                        .get(&key)
                        .ok_or_else(|| anyhow!("{}: no {key}", path.display()))?;
                    if src.size() != slot.size() {
                        bail!(
                            "{}: {key} has shape {:?} but the model's {} has shape {:?}: this optimizer state belongs to another model",
                            path.display(),
                            src.size(),
                            p.name,
                            slot.size()
                        );
                    }
                    slot.copy_(src);
                }
            }
            Ok(())
        })?;
        self.steps = tensors
            .get("steps")
            .map(|t| t.int64_value(&[0]))
            .ok_or_else(|| anyhow!("{}: no step count", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let lr = |s| cosine_lr(s, 100, 10, 1.0, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(55) - 0.55).abs() < 1e-9);
        assert!((lr(100) - 0.1).abs() < 1e-12);
        assert!((lr(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn matches_reference_adamw_step() {
        // One step from x=1 with grad 0.5: m=0.05, v=0.00025*... bias-corrected update = lr.
        let x = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("x".into(), x.shallow_clone())], 0.9, 0.999, 0.0);
        (&x * 0.5).sum(Kind::Float).backward();
        opt.step(0.1);
        let after = x.double_value(&[0]);
        assert!((after - 0.9).abs() < 1e-6, "{after}");
    }

    /// Values in [-1, 1] that depend only on `shape` and `salt`: not libtorch's global random
    /// generator, which tests running at the same time on other threads draw from too (two
    /// runs meant to start alike could then start apart).
    fn fixed(shape: &[i64], salt: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.737 + salt)
            .sin()
            .reshape(shape)
    }

    /// Parameters of a few shapes (matrices decay, vectors do not), their gradients set from
    /// fixed values for `steps` steps, then clipped and stepped by `opt`.
    fn run_steps(fused: bool, kind: Kind, steps: usize) -> (Vec<Tensor>, Vec<f64>) {
        let shapes: [&[i64]; 4] = [&[33, 17], &[17], &[5, 4, 3], &[1]];
        let params: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| fixed(s, i as f64).to_kind(kind).set_requires_grad(true))
            .collect();
        let named = params
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
            .collect();
        let mut opt = AdamW::new(named, 0.9, 0.95, 0.1);
        opt.fused = fused;
        let mut norms = Vec::new();
        for step in 0..steps {
            let loss = params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let w = fixed(&p.size(), 10.0 * (step + 1) as f64 + i as f64).to_kind(kind);
                    (p * w).sum(Kind::Float) * (1.0 + i as f64 + step as f64)
                })
                .fold(Tensor::from(0.0f32), |a, b| a + b);
            loss.backward();
            norms.push(opt.clip_grad_norm(if step % 2 == 0 { 1.0 } else { 1e9 }));
            opt.step(1e-2 * (step + 1) as f64);
            opt.zero_grad();
        }
        assert_eq!(opt.fused, fused, "the fused kernels fell back");
        (params, norms)
    }

    #[test]
    fn fused_kernels_match_the_plain_step_and_clip() {
        // f32: the same arithmetic in another order. bf16 parameters: within bf16's rounding.
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
            let (fused, fused_norms) = run_steps(true, kind, 4);
            let (plain, plain_norms) = run_steps(false, kind, 4);
            for (a, b) in fused_norms.iter().zip(&plain_norms) {
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "{kind:?}: norm {a} vs {b}"
                );
            }
            for (a, b) in fused.iter().zip(&plain) {
                let gap = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[]);
                let moved = b.to_kind(Kind::Float).abs().max().double_value(&[]);
                assert!(gap <= tol * moved.max(1.0), "{kind:?}: {gap} of {moved}");
            }
        }
    }

    #[test]
    fn a_state_of_other_shapes_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let x = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        AdamW::new(vec![("x".into(), x)], 0.9, 0.999, 0.0)
            .save(&path)
            .unwrap();
        let y = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut other = AdamW::new(vec![("x".into(), y)], 0.9, 0.999, 0.0);
        let err = other.load(&path).unwrap_err().to_string();
        assert!(
            err.contains("optimizer.safetensors") && err.contains("[2]") && err.contains("[3]"),
            "{err}"
        );
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let x = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("x".into(), x.shallow_clone())], 0.9, 0.999, 0.0);
        (&x * Tensor::from_slice(&[3.0f32, 4.0]))
            .sum(Kind::Float)
            .backward();
        assert!((opt.clip_grad_norm(1.0) - 5.0).abs() < 1e-6);
        let g = x.grad();
        assert!((g.double_value(&[0]) - 0.6).abs() < 1e-5);
    }
}
