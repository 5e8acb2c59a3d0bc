//! AdamW with weight-decay groups, the cosine schedule, and global-norm gradient clipping.
//!
//! The optimizer is written on tensors here, rather than taken from tch, because its state
//! (moments and step count) must go into checkpoints for an exact resume.

use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

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

    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(self.steps as i32);
        let bias2 = 1.0 - b2.powi(self.steps as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                if p.decay && self.weight_decay > 0.0 {
                    let _ = p.tensor.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                // In place where libtorch has the fused form (3 temporaries, not 8): every
                // rank of a data-parallel job repeats this step, so its cost does not shrink.
                // m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g²
                let _ = p.m.lerp_(&g, 1.0 - b1);
                let _ = p.v.g_mul_scalar_(b2).addcmul_(&g, &(&g * (1.0 - b2)));
                // x -= lr / bias1 · m / (sqrt(v) / sqrt(bias2) + eps)
                let mut denom = p.v.sqrt();
                let _ = denom.g_div_scalar_(bias2.sqrt()).g_add_scalar_(self.eps);
                let _ = p.tensor.addcdiv_(&(&p.m * (-lr / bias1)), &denom);
            }
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
