//! Classification by a generative model: each example's answer must be one of a fixed set of
//! labels ("positive", "negative"); the model picks the label whose tokens (answer and
//! end-of-turn, as the data format renders them) it finds most likely after the prompt.
//! All labels of an example are scored in one row: the prompt once, then every label placed
//! right after it and attending only to the prompt and to itself.
use crate::data::{read_records, tokenise, ChatTemplate};
use crate::error::{Result, TrainError};
use crate::recipe::DataFormat;
use crate::tokenizer::TextTokenizer;
use candle_core::{Device, Tensor, D};
use lorakit_models::CausalLm;
use serde_json::Value;
use std::path::Path;

/// An example as a shared prompt and one tokenised continuation per label.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub prompt: Vec<u32>,
    /// Per label: the tokens after the prompt and which of them are scored.
    pub options: Vec<(Vec<u32>, Vec<bool>)>,
    /// Index of the data's answer in the labels.
    pub gold: usize,
}

/// Accuracy and the confusion matrix (`confusion[gold][predicted]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifyReport {
    pub labels: Vec<String>,
    pub confusion: Vec<Vec<usize>>,
}

impl ClassifyReport {
    pub fn total(&self) -> usize {
        self.confusion.iter().flatten().sum()
    }
    pub fn correct(&self) -> usize {
        (0..self.labels.len()).map(|i| self.confusion[i][i]).sum()
    }
    pub fn accuracy(&self) -> f64 {
        self.correct() as f64 / self.total().max(1) as f64
    }
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "accuracy": self.accuracy(),
            "correct": self.correct(),
            "total": self.total(),
            "labels": self.labels,
            "confusion": self.confusion,
        })
    }
}

/// The answer of a record: the last assistant message (chat) or `output` (instruction).
fn answer_slot(v: &mut Value, format: DataFormat) -> std::result::Result<&mut Value, String> {
    match format {
        DataFormat::Completion | DataFormat::Classification | DataFormat::Preference => Err(
            "--labels scores a generative model's answers: data format instruction or chat".into(),
        ),
        DataFormat::Instruction => v
            .get_mut("output")
            .ok_or_else(|| "missing field \"output\"".into()),
        DataFormat::Chat => v
            .get_mut("messages")
            .and_then(Value::as_array_mut)
            .and_then(|m| {
                m.iter_mut()
                    .rev()
                    .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            })
            .and_then(|m| m.get_mut("content"))
            .ok_or_else(|| "no assistant message to classify".into()),
    }
}

/// Reads `path` and renders every example once per label.
pub fn load(
    path: &Path,
    format: DataFormat,
    tok: &TextTokenizer,
    labels: &[String],
) -> Result<Vec<Choice>> {
    if labels.len() < 2 {
        return Err(TrainError::io(path, "--labels needs at least two labels"));
    }
    let template = match format {
        DataFormat::Chat => Some(ChatTemplate::new(tok)?),
        _ => None,
    };
    let mut out = Vec::new();
    for (line, mut v) in read_records(path)? {
        let err = |message: String| TrainError::Data {
            file: path.into(),
            line,
            message,
        };
        let slot = answer_slot(&mut v, format).map_err(err)?;
        let answer = slot
            .as_str()
            .ok_or_else(|| err("the answer is not a string".into()))?
            .trim()
            .to_string();
        let gold = labels.iter().position(|l| *l == answer).ok_or_else(|| {
            err(format!(
                "answer {answer:?} is not one of the labels ({})",
                labels.join(", ")
            ))
        })?;
        let mut rendered = Vec::with_capacity(labels.len());
        for label in labels {
            *answer_slot(&mut v, format).map_err(err)? = Value::String(label.clone());
            rendered.push(
                tokenise(&v, format, tok, template.as_ref(), false, usize::MAX).map_err(err)?,
            );
        }
        // the prompt: the common prefix, up to the first scored token of any rendering
        let mut p = rendered[0].ids.len();
        for r in &rendered {
            let common = r
                .ids
                .iter()
                .zip(&rendered[0].ids)
                .take_while(|(a, b)| a == b)
                .count();
            let first_target = r.targets.iter().position(|t| *t).unwrap_or(r.ids.len());
            p = p.min(common).min(first_target);
        }
        if p == 0 {
            return Err(err(
                "the labels leave no shared prompt to condition on".into()
            ));
        }
        out.push(Choice {
            prompt: rendered[0].ids[..p].to_vec(),
            options: rendered
                .iter()
                .map(|r| (r.ids[p..].to_vec(), r.targets[p..].to_vec()))
                .collect(),
            gold,
        });
    }
    if out.is_empty() {
        return Err(TrainError::DataFile {
            file: path.into(),
            message: "no examples (the file is empty)".into(),
        });
    }
    Ok(out)
}

/// One packed row: ids, positions, which segment (0 = prompt, k+1 = label k) each token is in.
fn pack(c: &Choice) -> (Vec<u32>, Vec<usize>, Vec<usize>) {
    let p = c.prompt.len();
    let mut ids = c.prompt.clone();
    let mut pos: Vec<usize> = (0..p).collect();
    let mut seg = vec![0; p];
    for (k, (opt, _)) in c.options.iter().enumerate() {
        for (i, t) in opt.iter().enumerate() {
            ids.push(*t);
            pos.push(p + i);
            seg.push(k + 1);
        }
    }
    (ids, pos, seg)
}

/// Log-likelihood of every label of every choice, `batch_size` choices per forward pass.
pub fn score(
    model: &dyn CausalLm,
    choices: &[Choice],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f64>>> {
    let mut scores = Vec::with_capacity(choices.len());
    for chunk in choices.chunks(batch_size.max(1)) {
        let rows: Vec<_> = chunk.iter().map(pack).collect();
        let s = rows.iter().map(|r| r.0.len()).max().unwrap_or(1);
        let b = rows.len();
        let mut ids = vec![pad_id; b * s];
        let mut positions = vec![vec![0usize; s]; b];
        let mut bias = vec![-1.0e9f32; b * s * s];
        // (row, label) → [(flat index predicting token, token)]
        let mut wanted: Vec<Vec<Vec<(usize, u32)>>> = Vec::with_capacity(b);
        let mut at: Vec<u32> = Vec::new();
        for (r, (row, pos, seg)) in rows.iter().enumerate() {
            for (i, t) in row.iter().enumerate() {
                ids[r * s + i] = *t;
                positions[r][i] = pos[i];
                for j in 0..=i {
                    if seg[j] == 0 || seg[j] == seg[i] {
                        bias[(r * s + i) * s + j] = 0.0;
                    }
                }
            }
            for i in row.len()..s {
                bias[(r * s + i) * s + i] = 0.0; // padding sees itself only
            }
            let c = &chunk[r];
            let p = c.prompt.len();
            let mut per_label = Vec::new();
            let mut offset = p;
            for (opt, targets) in &c.options {
                let mut w = Vec::new();
                for (i, t) in opt.iter().enumerate() {
                    if targets[i] {
                        // token i of the label is predicted by the previous token of its
                        // sequence: the label's own token i-1, or the prompt's last token
                        let prev = if i == 0 { p - 1 } else { offset + i - 1 };
                        w.push((at.len(), *t));
                        at.push((r * s + prev) as u32);
                    }
                }
                per_label.push(w);
                offset += opt.len();
            }
            wanted.push(per_label);
        }
        let ids = Tensor::from_vec(ids, (b, s), device)?;
        let bias = Tensor::from_vec(bias, (b, 1, s, s), device)?;
        let n = at.len();
        let at_t = Tensor::from_vec(at, n, device)?;
        let logits = model.logits_packed(&ids, &positions, &bias, &at_t)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        for per_label in wanted {
            scores.push(
                per_label
                    .iter()
                    .map(|w| w.iter().map(|(k, t)| logp[*k][*t as usize] as f64).sum())
                    .collect(),
            );
        }
    }
    Ok(scores)
}

/// Picks the most likely label of each choice and tallies the confusion matrix.
pub fn classify(
    model: &dyn CausalLm,
    choices: &[Choice],
    labels: &[String],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<ClassifyReport> {
    let scores = score(model, choices, pad_id, batch_size, device)?;
    if let Some(bad) = scores.iter().flatten().find(|s| !s.is_finite()) {
        return Err(crate::error::TrainError::NonFiniteOutput {
            what: "a label score",
            value: *bad,
        });
    }
    let mut confusion = vec![vec![0; labels.len()]; labels.len()];
    for (c, s) in choices.iter().zip(&scores) {
        let best = (0..s.len())
            .max_by(|a, b| s[*a].total_cmp(&s[*b]))
            .unwrap_or(0);
        confusion[c.gold][best] += 1;
    }
    Ok(ClassifyReport {
        labels: labels.to_vec(),
        confusion,
    })
}
