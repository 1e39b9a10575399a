//! AdamW (decoupled weight decay, as in PyTorch) over named variables, with state that can be
//! saved and restored exactly, and global-norm gradient clipping.
use candle_core::{DType, Result, Tensor, Var};
use lorakit_ops::{adamw_step, AdamWStep};
use std::collections::BTreeMap;

pub struct AdamW {
    /// Sorted by name so every pass visits variables in the same order.
    vars: Vec<(String, Var)>,
    /// Per variable: its learning rate as a multiple of the step's, and whether weight decay
    /// applies ([`AdamW::with_loraplus`]; 1 and yes by default).
    groups: Vec<ParamGroup>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// How one variable is updated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamGroup {
    pub lr_scale: f64,
    pub decays: bool,
}

/// LoRA+ (Hayou et al. 2024) as PEFT's `create_loraplus_optimizer` groups parameters: `lora_B`
/// matrices and every 1-D tensor (DoRA magnitudes, trained biases) at `lr · ratio`, the rest
/// (`lora_A`, trained weight matrices) at `lr`; names containing `bias` get no weight decay.
pub fn loraplus_group(name: &str, rank: usize, ratio: f64) -> ParamGroup {
    let fast = name.contains("lora_B") || rank == 1;
    ParamGroup {
        lr_scale: if fast { ratio } else { 1.0 },
        decays: !name.contains("bias"),
    }
}

impl AdamW {
    /// Groups the variables as LoRA+ does ([`loraplus_group`]).
    pub fn with_loraplus(mut self, ratio: f64) -> Self {
        self.groups = self
            .vars
            .iter()
            .map(|(n, v)| loraplus_group(n, v.rank(), ratio))
            .collect();
        self
    }

    /// Each variable's group, in [`vars`](Self::vars) order.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    pub fn new(vars: BTreeMap<String, Var>, weight_decay: f64) -> Result<Self> {
        let vars: Vec<(String, Var)> = vars.into_iter().collect();
        let zeros = |v: &Var| v.zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<Vec<_>>>()?;
        let groups = vec![
            ParamGroup {
                lr_scale: 1.0,
                decays: true
            };
            vars.len()
        ];
        Ok(AdamW {
            vars,
            groups,
            m,
            v,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The variables' tensors, in order (what gradients are asked for).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.vars
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }

    /// Names of variables with no gradient in `grads` (one entry per variable, in order).
    pub fn missing_grads(&self, grads: &[Option<Tensor>]) -> Vec<String> {
        self.vars
            .iter()
            .zip(grads)
            .filter(|(_, g)| g.is_none())
            .map(|((n, _), _)| n.clone())
            .collect()
    }

    /// One update with learning rate `lr` from averaged gradients `grads` (one per var).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let group = self.groups[i];
            let lr = lr * group.lr_scale;
            let weight_decay = if group.decays { self.weight_decay } else { 0.0 };
            let fused = AdamWStep {
                lr,
                beta1: b1,
                beta2: b2,
                eps: self.eps,
                weight_decay,
                c1,
                c2,
            };
            // a gradient that still carries a graph would chain every step's graph into the
            // moments and keep it alive
            let g = &grads[i].detach();
            // on the GPU: one kernel per variable, the same arithmetic in f32
            if let Some(done) = adamw_step(var.as_tensor(), &self.m[i], &self.v[i], g, &fused) {
                done?;
                continue;
            }
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let theta = var.as_tensor();
            let decayed = if weight_decay > 0.0 {
                (theta * (1.0 - lr * weight_decay))?
            } else {
                theta.clone()
            };
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as named tensors, for checkpoints.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("exp_avg.{name}"), self.m[i].clone());
            out.insert(format!("exp_avg_sq.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`state`](Self::state); every variable must be present.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: usize,
    ) -> std::result::Result<(), String> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let t = state
                    .get(&format!("{prefix}.{name}"))
                    .ok_or(format!("optimizer state has no {prefix}.{name}"))?;
                if t.dims() != var.dims() {
                    return Err(format!(
                        "optimizer state {prefix}.{name} has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    ));
                }
                *slot = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(var.device()))
                    .map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (0 = off); returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_reference_update() -> Result<()> {
        // one parameter, two steps, against the closed-form PyTorch AdamW recurrence
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &dev)?;
        let mut map = BTreeMap::new();
        map.insert("p".to_string(), p.clone());
        let mut opt = AdamW::new(map, 0.1)?;
        let (lr, b1, b2, eps, wd) = (0.01f64, 0.9f64, 0.999f64, 1e-8f64, 0.1f64);
        let mut theta = [1.0f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for t in 1..=2 {
            let g = [0.5 * t as f64, -0.25];
            opt.step(&[Tensor::new(&[g[0] as f32, g[1] as f32], &dev)?], lr)?;
            for i in 0..2 {
                theta[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                theta[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let got = p.as_tensor().to_vec1::<f32>()?;
        for i in 0..2 {
            assert!(
                (got[i] as f64 - theta[i]).abs() < 1e-6,
                "{got:?} vs {theta:?}"
            );
        }
        Ok(())
    }

    fn grads_of(opt: &AdamW, store: &candle_core::backprop::GradStore) -> Vec<Option<Tensor>> {
        opt.tensors()
            .iter()
            .map(|t| store.get(t).cloned())
            .collect()
    }

    #[test]
    fn variables_off_the_loss_path_are_reported_as_missing_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let used = Var::new(&[1.0f32, 2.0], &dev)?;
        let unused = Var::new(&[3.0f32], &dev)?;
        let map = BTreeMap::from([
            ("a.lora_A.weight".to_string(), used.clone()),
            ("b.lora_B.weight".to_string(), unused),
        ]);
        let opt = AdamW::new(map, 0.0)?;
        // a gradient-blocking op (detach) between `used` and the loss is as bad as no path at all
        let grads = used.as_tensor().detach().sqr()?.sum_all()?.backward()?;
        assert_eq!(
            opt.missing_grads(&grads_of(&opt, &grads)),
            vec!["a.lora_A.weight", "b.lora_B.weight"]
        );
        let grads = used.as_tensor().sqr()?.sum_all()?.backward()?;
        assert_eq!(
            opt.missing_grads(&grads_of(&opt, &grads)),
            vec!["b.lora_B.weight"]
        );
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3.0f32], &dev)?, Tensor::new(&[4.0f32], &dev)?];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>()?[0];
        let b = g[1].to_vec1::<f32>()?[0];
        assert!(((a * a + b * b).sqrt() - 1.0).abs() < 1e-5);
        Ok(())
    }
}
