//! Learning-rate schedules with linear warmup. After warmup the curves are transformers'
//! `get_{constant,linear,cosine}_schedule_with_warmup`; the warmup itself is one step ahead of
//! them: step `k` (0-based) of `W` warmup steps runs at `lr·(k+1)/W`, where transformers runs
//! it at `lr·k/W` and so spends its first step at a learning rate of 0.
use crate::recipe::Scheduler;

/// Learning rate for optimizer step `step` (0-based) of `total`.
pub fn lr_at(kind: Scheduler, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match kind {
        Scheduler::Constant => base,
        Scheduler::Linear => base * (1.0 - progress),
        Scheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert!((lr_at(Scheduler::Cosine, 1.0, 0, 4, 104) - 0.25).abs() < 1e-12);
        assert!((lr_at(Scheduler::Cosine, 1.0, 3, 4, 104) - 1.0).abs() < 1e-12);
        assert!((lr_at(Scheduler::Cosine, 1.0, 4, 4, 104) - 1.0).abs() < 1e-12);
        assert!((lr_at(Scheduler::Cosine, 1.0, 54, 4, 104) - 0.5).abs() < 1e-12);
        assert!((lr_at(Scheduler::Linear, 1.0, 54, 4, 104) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Scheduler::Constant, 0.3, 90, 0, 100), 0.3);
        assert!(lr_at(Scheduler::Linear, 1.0, 103, 4, 104) < 0.02);
    }
}
