//! OLoRA (Büyükakyüz 2024; `init_lora_weights: "olora"`): A and B start as the first r rows of
//! R and columns of Q of W's QR decomposition (`B₀ = Q[:, :r]`, `A₀ = R[:r]`, not rescaled, as
//! PEFT does), and training runs on the residual `W − s·B₀·A₀` ([`crate::residual`]). The QR
//! follows LAPACK's sign convention, so the factors are `torch.linalg.qr`'s.
use crate::residual;
use crate::variant::{InitInput, Initial, LoraVariant};
use candle_core::Result;
use lorakit_ops::linalg::{qr_leading, Mat};

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
}
