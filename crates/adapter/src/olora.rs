//! OLoRA (Büyükakyüz 2024; `init_lora_weights: "olora"`): A and B start as the first r rows of
//! R and columns of Q of W's QR decomposition (`B₀ = Q[:, :r]`, `A₀ = R[:r]`, not rescaled, as
//! PEFT does), and training runs on the residual `W − s·B₀·A₀` ([`crate::residual`]). The QR
//! follows LAPACK's sign convention, so the factors are `torch.linalg.qr`'s.
use crate::lora_linear::LowRank;
use crate::residual;
use crate::variant::{InitInput, Initial, LoraVariant};
use candle_core::{Result, Tensor};
use lorakit_ops::dropout::DropoutMask;
use lorakit_ops::linalg::{qr_leading, Mat};
use lorakit_ops::lora::lora_forward;

#[derive(Debug)]
pub struct Olora;

impl LoraVariant for Olora {
    fn name(&self) -> &'static str {
        "olora"
    }

    fn rewrites_base(&self) -> bool {
        true
    }

    fn init(&self, m: &InitInput) -> Result<Initial> {
        residual::check_rank(m.rank, m.weight, "OLoRA")?;
        let (q, r) = qr_leading(&Mat::from_tensor(m.weight)?, m.rank);
        Ok(Initial {
            a: r.to_tensor(m.device)?,
            b: q.to_tensor(m.device)?,
            extra: Vec::new(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        weight_t: Option<&Tensor>,
        low: &LowRank,
        dropout: Option<DropoutMask>,
        _train: bool,
    ) -> Result<Tensor> {
        lora_forward(x, weight, weight_t, &low.a, &low.b, low.scaling, dropout)
    }

    fn merged_weight(&self, weight: &Tensor, low: &LowRank) -> Result<Tensor> {
        residual::merged_weight(self, weight, low)
    }
}
