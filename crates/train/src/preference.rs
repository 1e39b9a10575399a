//! Preference tuning: pairs of a preferred and a rejected answer to one prompt, and the DPO and
//! ORPO objectives over them.
//!
//! Data (`data.format: preference`, TRL's conventions): `{"prompt", "chosen", "rejected"}` as
//! text — the prompt tokenised once with the tokenizer's special tokens (BOS), each answer
//! without them and ended by EOS — or conversational, `{"messages" | "prompt": [...],
//! "chosen": [{"role": "assistant", ...}], "rejected": [...]}` rendered with the chat template:
//! the prompt is the conversation with the generation prompt, each answer what the template
//! renders after it (its end-of-turn tokens included). Every answer token is scored.
//!
//! The log-probability of an answer is the sum over its tokens. DPO (Rafailov et al.):
//! `−log σ(β·((π_c − ref_c) − (π_r − ref_r)))`, the reference being the same model with its
//! adapters switched off ([`lorakit_adapter::without_adapters`]) — no second copy of the
//! weights. ORPO (Hong et al.): the chosen answer's mean token NLL minus `λ·log σ(log-odds)` of
//! the per-token mean log-probabilities, no reference. Rewards as TRL logs them: DPO
//! `β·(π − ref)`, ORPO `β·mean log-prob`.
use crate::data::{records, ChatTemplate, Example};
use crate::error::{Result, TrainError};
use crate::loss::Batch;
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use lorakit_models::CausalLm;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// What training minimises.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Next-token cross-entropy on the target tokens.
    #[default]
    Sft,
    /// Direct preference optimisation against the adapter-free reference.
    Dpo,
    /// Odds-ratio preference optimisation (no reference).
    Orpo,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Dpo => "dpo",
            Objective::Orpo => "orpo",
        }
    }

    pub fn is_preference(self) -> bool {
        self != Objective::Sft
    }
}

/// One tokenised preference pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl Pair {
    /// The pair as two examples, prompt + chosen and prompt + rejected, scoring the answers.
    fn examples(&self) -> [Example; 2] {
        let row = |answer: &[u32]| {
            let mut ids = self.prompt.clone();
            ids.extend_from_slice(answer);
            let mut targets = vec![false; self.prompt.len()];
            targets.extend(std::iter::repeat_n(true, answer.len()));
            Example {
                ids,
                targets,
                label: None,
            }
        };
        [row(&self.chosen), row(&self.rejected)]
    }
}

/// A tokenised preference data set.
#[derive(Clone, Debug, Default)]
pub struct PreferenceSet {
    pub pairs: Vec<Pair>,
    /// Pairs cut to fit `max_seq_len` (prompt from its start, answers at their end).
    pub truncated: usize,
}

/// Reads and tokenises a preference file.
pub fn load(path: &Path, tok: &TextTokenizer, max_seq_len: usize) -> Result<PreferenceSet> {
    parse(crate::data::read_data_file(path)?, path, tok, max_seq_len)
}

/// Parses and tokenises preference JSON Lines `bytes`; `path` names them in messages.
pub fn parse(
    bytes: Vec<u8>,
    path: &Path,
    tok: &TextTokenizer,
    max_seq_len: usize,
) -> Result<PreferenceSet> {
    let mut set = PreferenceSet::default();
    let mut template: Option<ChatTemplate> = None;
    for (n, v) in records(bytes, path)? {
        let err = |message: String| TrainError::Data {
            file: path.into(),
            line: n,
            message,
        };
        let conversational = v.get("chosen").is_some_and(Value::is_array);
        let pair = if conversational {
            if template.is_none() {
                template = Some(ChatTemplate::new(tok)?);
            }
            let t = template
                .as_ref()
                .ok_or_else(|| err("no chat template".into()))?;
            conversation_pair(&v, tok, t).map_err(err)?
        } else {
            text_pair(&v, tok).map_err(err)?
        };
        let (pair, cut) = fit(pair, max_seq_len);
        set.truncated += cut as usize;
        set.pairs.push(pair);
    }
    if set.pairs.is_empty() {
        return Err(TrainError::DataFile {
            file: path.into(),
            message: "no preference pairs (the file is empty)".into(),
        });
    }
    Ok(set)
}

fn text_field<'a>(v: &'a Value, name: &str) -> std::result::Result<&'a str, String> {
    match v.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "\"{name}\" must be a string (or, conversational, a list of messages), got {other}"
        )),
        None => Err(format!(
            "missing field \"{name}\" (expected {{\"prompt\", \"chosen\", \"rejected\"}})"
        )),
    }
}

fn text_pair(v: &Value, tok: &TextTokenizer) -> std::result::Result<Pair, String> {
    let prompt = text_field(v, "prompt")?;
    let answer = |name: &str| -> std::result::Result<Vec<u32>, String> {
        let text = text_field(v, name)?;
        if text.trim().is_empty() {
            return Err(format!("\"{name}\" is empty"));
        }
        let mut ids = tok.encode(text, false).map_err(|e| e.to_string())?;
        if let Some(e) = tok.eos_id {
            ids.push(e);
        }
        Ok(ids)
    };
    let prompt = tok.encode(prompt, true).map_err(|e| e.to_string())?;
    if prompt.is_empty() {
        return Err("\"prompt\" is empty and the tokenizer adds no BOS: the first answer token would have nothing to be predicted from".into());
    }
    Ok(Pair {
        prompt,
        chosen: answer("chosen")?,
        rejected: answer("rejected")?,
    })
}

fn messages<'a>(v: &'a Value, name: &str) -> std::result::Result<&'a Vec<Value>, String> {
    let list = v
        .get(name)
        .and_then(Value::as_array)
        .ok_or(format!("\"{name}\" must be a list of messages"))?;
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        if !matches!(role, Some("system" | "user" | "assistant")) {
            return Err(format!(
                "{name}[{i}] needs \"role\": system, user or assistant"
            ));
        }
        if m.get("content").and_then(Value::as_str).is_none() {
            return Err(format!("{name}[{i}] has no string \"content\""));
        }
    }
    Ok(list)
}

fn conversation_pair(
    v: &Value,
    tok: &TextTokenizer,
    template: &ChatTemplate,
) -> std::result::Result<Pair, String> {
    let key = if v.get("messages").is_some() {
        "messages"
    } else {
        "prompt"
    };
    let prompt = messages(v, key)?;
    if prompt.is_empty() {
        return Err(format!("\"{key}\" is empty"));
    }
    let prompt_text = template.render(prompt, tok, true)?;
    let rendered = |name: &str| -> std::result::Result<(Vec<u32>, usize), String> {
        let answer = messages(v, name)?;
        if answer.is_empty() || answer.iter().any(|m| m["role"] != "assistant") {
            return Err(format!("\"{name}\" must hold assistant messages"));
        }
        let conversation: Vec<Value> = prompt.iter().chain(answer).cloned().collect();
        let full = template.render(&conversation, tok, false)?;
        if !full.starts_with(&prompt_text) {
            return Err("the chat template does not render the conversation as the prompt followed by the answer".into());
        }
        let (ids, offsets) = tok.encode_with_offsets(&full).map_err(|e| e.to_string())?;
        let prompt_tokens = offsets
            .iter()
            .take_while(|(s, _)| *s < prompt_text.len())
            .count();
        Ok((ids, prompt_tokens))
    };
    let (chosen, pc) = rendered("chosen")?;
    let (rejected, pr) = rendered("rejected")?;
    if pc != pr || chosen[..pc] != rejected[..pr] || pc == 0 {
        return Err(
            "the prompt tokenises differently before the chosen and the rejected answer".into(),
        );
    }
    if chosen.len() == pc || rejected.len() == pr {
        return Err("an answer renders to no tokens".into());
    }
    Ok(Pair {
        prompt: chosen[..pc].to_vec(),
        chosen: chosen[pc..].to_vec(),
        rejected: rejected[pr..].to_vec(),
    })
}

/// Cuts a pair to rows of at most `max_seq_len` tokens: answers keep their first tokens (at
/// least half the row each, or all that the prompt leaves), the prompt its last. True if cut.
fn fit(mut pair: Pair, max_seq_len: usize) -> (Pair, bool) {
    let longest = pair.chosen.len().max(pair.rejected.len());
    if pair.prompt.len() + longest <= max_seq_len {
        return (pair, false);
    }
    let budget = max_seq_len
        .saturating_sub(pair.prompt.len())
        .max(max_seq_len / 2);
    pair.chosen.truncate(budget);
    pair.rejected.truncate(budget);
    let answer = pair.chosen.len().max(pair.rejected.len());
    let keep = max_seq_len.saturating_sub(answer).max(1);
    let drop = pair.prompt.len().saturating_sub(keep);
    pair.prompt.drain(..drop);
    (pair, true)
}

/// Sums of each answer's token log-probabilities, chosen then rejected, for `pairs`
/// (`[2·pairs]`, f32, differentiable when `train`).
pub fn answer_logps(
    model: &dyn CausalLm,
    pairs: &[&Pair],
    pad_id: u32,
    train: bool,
    device: &Device,
) -> Result<Tensor> {
    // rows: chosen of every pair, then rejected (TRL's concatenated batch)
    let examples: Vec<[Example; 2]> = pairs.iter().map(|p| p.examples()).collect();
    let order: Vec<&Example> = examples
        .iter()
        .map(|[c, _]| c)
        .chain(examples.iter().map(|[_, r]| r))
        .collect();
    let batch = Batch::new(&order, pad_id, device)?;
    let hidden = model.hidden_states(&batch.ids, Some(&batch.attention), train)?;
    let mut at = 0;
    let mut sums = Vec::with_capacity(order.len());
    for e in &order {
        let n = e.targets.iter().skip(1).filter(|t| **t).count();
        let nll = model.head_loss(
            &hidden,
            &batch.positions.narrow(0, at, n)?,
            &batch.labels.narrow(0, at, n)?,
            train,
        )?;
        sums.push(nll.neg()?);
        at += n;
    }
    Ok(Tensor::stack(&sums, 0)?.to_dtype(DType::F32)?)
}

/// The reference's answer log-probabilities of `pairs` (adapters switched off, no dropout, no
/// gradient), `[2·pairs]` as [`answer_logps`] orders them.
pub fn reference_logps(
    model: &dyn CausalLm,
    pairs: &[&Pair],
    pad_id: u32,
    device: &Device,
) -> Result<Tensor> {
    let logps =
        lorakit_adapter::without_adapters(|| answer_logps(model, pairs, pad_id, false, device))?;
    Ok(logps.detach())
}

/// The reference's (chosen, rejected) log-probabilities of every pair of `pairs`, in batches of
/// `batch_size` pairs: they never change, so a run computes them once.
pub fn reference_table(
    model: &dyn CausalLm,
    pairs: &[Pair],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<(f32, f32)>> {
    let refs: Vec<&Pair> = pairs.iter().collect();
    let mut all = Vec::with_capacity(refs.len());
    for chunk in refs.chunks(batch_size.max(1)) {
        let l = reference_logps(model, chunk, pad_id, device)?.to_vec1::<f32>()?;
        let k = chunk.len();
        all.extend((0..k).map(|i| (l[i], l[k + i])));
    }
    Ok(all)
}

/// Rows of `table` for the pairs `idx`, as [`answer_logps`] orders them (chosen, then rejected).
pub fn reference_rows(table: &[(f32, f32)], idx: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = idx
        .iter()
        .map(|i| table[*i].0)
        .chain(idx.iter().map(|i| table[*i].1))
        .collect();
    Ok(Tensor::from_vec(v, 2 * idx.len(), device)?)
}

/// The objective's settings.
#[derive(Clone, Copy, Debug)]
pub struct PreferenceLoss {
    pub objective: Objective,
    /// DPO's β; ORPO's λ.
    pub beta: f64,
}

/// What one batch of pairs contributes: the loss to differentiate, and summed figures.
pub struct PairOutcome {
    /// `pair_scale · Σ per-pair loss` (DPO), or `token_scale · Σ chosen NLL − pair_scale · λ ·
    /// Σ log σ(log-odds)` (ORPO), f32 scalar.
    pub loss: Tensor,
    pub stats: PairStats,
}

/// Sums over pairs; [`PairStats::means`] turns them into TRL's logged means.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairStats {
    pub pairs: usize,
    pub chosen_tokens: usize,
    /// Σ of the unscaled objective per pair (DPO loss; ORPO NLL_c/n_c − λ·log σ).
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub correct: usize,
}

/// TRL's logged figures: means over pairs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PairMeans {
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub reward_accuracy: f64,
    pub reward_margin: f64,
}

impl PairStats {
    pub fn add(&mut self, o: &PairStats) {
        self.pairs += o.pairs;
        self.chosen_tokens += o.chosen_tokens;
        self.loss += o.loss;
        self.rewards_chosen += o.rewards_chosen;
        self.rewards_rejected += o.rewards_rejected;
        self.correct += o.correct;
    }

    pub fn means(&self) -> PairMeans {
        let n = self.pairs.max(1) as f64;
        PairMeans {
            loss: self.loss / n,
            rewards_chosen: self.rewards_chosen / n,
            rewards_rejected: self.rewards_rejected / n,
            reward_accuracy: self.correct as f64 / n,
            reward_margin: (self.rewards_chosen - self.rewards_rejected) / n,
        }
    }
}

impl PreferenceLoss {
    /// The objective on `pairs`: policy log-probabilities computed here (`train`: dropout on,
    /// differentiable), the reference's given (`reference`, DPO only, as [`reference_logps`]).
    /// `pair_scale` and `token_scale` normalise by the optimizer step's pairs and chosen tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        model: &dyn CausalLm,
        pairs: &[&Pair],
        reference: Option<&Tensor>,
        pad_id: u32,
        train: bool,
        pair_scale: f64,
        token_scale: f64,
        device: &Device,
    ) -> Result<PairOutcome> {
        let p = pairs.len();
        let policy = answer_logps(model, pairs, pad_id, train, device)?.to_dtype(DType::F64)?;
        let (pc, pr) = (policy.narrow(0, 0, p)?, policy.narrow(0, p, p)?);
        let beta = self.beta;
        let chosen_tokens: usize = pairs.iter().map(|x| x.chosen.len()).sum();
        let (loss, per_pair, rc, rr) = match self.objective {
            Objective::Dpo => {
                let reference = reference.ok_or_else(|| {
                    candle_core::Error::Msg("dpo needs the reference log-probabilities".into())
                })?;
                let reference = reference.to_dtype(DType::F64)?;
                let (fc, fr) = (reference.narrow(0, 0, p)?, reference.narrow(0, p, p)?);
                let rc = ((&pc - &fc)? * beta)?;
                let rr = ((&pr - &fr)? * beta)?;
                let per_pair = softplus(&(&rr - &rc)?)?;
                let loss = (per_pair.sum_all()? * pair_scale)?;
                (loss, per_pair, rc, rr)
            }
            Objective::Orpo => {
                let len = |f: &dyn Fn(&Pair) -> usize| -> Result<Tensor> {
                    let v: Vec<f64> = pairs.iter().map(|x| f(x) as f64).collect();
                    Ok(Tensor::from_vec(v, p, device)?)
                };
                let lc = (&pc / len(&|x| x.chosen.len())?)?;
                let lr = (&pr / len(&|x| x.rejected.len())?)?;
                let log_odds = ((&lc - &lr)? - (log1m_exp(&lc)? - log1m_exp(&lr)?)?)?;
                let ratio = softplus(&log_odds.neg()?)?.neg()?;
                let nll = pc.neg()?;
                let loss =
                    ((nll.sum_all()? * token_scale)? - (ratio.sum_all()? * (beta * pair_scale))?)?;
                // per pair, as a lone pair would count it
                let per_pair = ((&nll / len(&|x| x.chosen.len())?)? - (ratio * beta)?)?;
                (loss, per_pair, (lc * beta)?, (lr * beta)?)
            }
            Objective::Sft => {
                return Err(candle_core::Error::Msg(
                    "the sft objective has no preference loss".into(),
                )
                .into())
            }
        };
        let (rc_v, rr_v) = (rc.to_vec1::<f64>()?, rr.to_vec1::<f64>()?);
        let stats = PairStats {
            pairs: p,
            chosen_tokens,
            loss: per_pair.sum_all()?.to_scalar::<f64>()?,
            rewards_chosen: rc_v.iter().sum(),
            rewards_rejected: rr_v.iter().sum(),
            correct: rc_v.iter().zip(&rr_v).filter(|(c, r)| c > r).count(),
        };
        Ok(PairOutcome {
            loss: loss.to_dtype(DType::F32)?,
            stats,
        })
    }
}

/// `log(1 + eˣ)`, stable for large |x|: `max(x, 0) + log(1 + e^−|x|)`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// `log(1 − eˣ)` for x < 0 (the log-probability of "not this answer").
fn log1m_exp(x: &Tensor) -> Result<Tensor> {
    Ok((x.exp()?.neg()? + 1.0)?.log()?)
}

/// The objective's mean figures over a whole preference set, in batches of `batch_size` pairs
/// (no dropout): `lorakit eval --format preference` and the eval of a preference run. DPO reads
/// the reference from `reference` (a [`reference_table`] of `set`) when given, else computes it.
pub fn evaluate(
    model: &dyn CausalLm,
    set: &PreferenceSet,
    loss: PreferenceLoss,
    pad_id: u32,
    batch_size: usize,
    reference: Option<&[(f32, f32)]>,
    device: &Device,
) -> Result<PairMeans> {
    let mut total = PairStats::default();
    let order: Vec<usize> = (0..set.pairs.len()).collect();
    for idx in order.chunks(batch_size.max(1)) {
        let chunk: Vec<&Pair> = idx.iter().map(|i| &set.pairs[*i]).collect();
        let chunk = chunk.as_slice();
        let reference = match (loss.objective, reference) {
            (Objective::Dpo, Some(table)) => Some(reference_rows(table, idx, device)?),
            (Objective::Dpo, None) => Some(reference_logps(model, chunk, pad_id, device)?),
            _ => None,
        };
        let out = loss.apply(
            model,
            chunk,
            reference.as_ref(),
            pad_id,
            false,
            1.0,
            1.0,
            device,
        )?;
        total.add(&out.stats);
    }
    let means = total.means();
    if !means.loss.is_finite() {
        return Err(TrainError::NonFiniteOutput {
            what: "a preference loss",
            value: means.loss,
        });
    }
    Ok(means)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_keeps_the_answers_starts_and_the_prompts_end() {
        let pair = Pair {
            prompt: (0..10).collect(),
            chosen: (100..106).collect(),
            rejected: (200..203).collect(),
        };
        let (same, cut) = fit(pair.clone(), 16);
        assert_eq!((same, cut), (pair.clone(), false));
        let (cut_pair, cut) = fit(pair, 12);
        assert!(cut);
        // answers get half the row (6), the prompt the rest (6 of its last tokens)
        assert_eq!(cut_pair.chosen, (100..106).collect::<Vec<_>>());
        assert_eq!(cut_pair.rejected, (200..203).collect::<Vec<_>>());
        assert_eq!(cut_pair.prompt, (4..10).collect::<Vec<_>>());
    }

    #[test]
    fn softplus_and_log1m_exp_are_stable() -> Result<()> {
        let x = Tensor::new(&[-800f64, -1.0, 0.0, 3.0, 800.0], &Device::Cpu)?;
        let got = softplus(&x)?.to_vec1::<f64>()?;
        let want: Vec<f64> = [-800f64, -1.0, 0.0, 3.0, 800.0]
            .iter()
            .map(|v| if *v > 30.0 { *v } else { v.exp().ln_1p() })
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
        }
        let l = log1m_exp(&Tensor::new(&[-2f64], &Device::Cpu)?)?.to_vec1::<f64>()?;
        assert!((l[0] - (-(-2f64).exp()).ln_1p()).abs() < 1e-12);
        Ok(())
    }
}
