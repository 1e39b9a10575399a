//! `metrics.jsonl` (one JSON object per logged step) and the `loss.svg` plot drawn from it.
use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsRow {
    pub step: usize,
    pub epoch: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// The process's peak resident memory so far, MiB (Linux; training steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
    /// Preference objectives, TRL's reward figures (means over the step's pairs).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<RewardFigures>,
    /// The same over the eval pairs.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub eval_rewards: Option<EvalRewardFigures>,
}

/// `rewards_chosen`, `rewards_rejected`, `reward_accuracy`, `reward_margin`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct RewardFigures {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub reward_accuracy: f64,
    pub reward_margin: f64,
}

/// [`RewardFigures`] on the eval pairs, `eval_`-prefixed.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalRewardFigures {
    pub eval_rewards_chosen: f64,
    pub eval_rewards_rejected: f64,
    pub eval_reward_accuracy: f64,
    pub eval_reward_margin: f64,
}

impl From<crate::preference::PairMeans> for RewardFigures {
    fn from(m: crate::preference::PairMeans) -> Self {
        RewardFigures {
            rewards_chosen: m.rewards_chosen,
            rewards_rejected: m.rewards_rejected,
            reward_accuracy: m.reward_accuracy,
            reward_margin: m.reward_margin,
        }
    }
}

impl From<crate::preference::PairMeans> for EvalRewardFigures {
    fn from(m: crate::preference::PairMeans) -> Self {
        EvalRewardFigures {
            eval_rewards_chosen: m.rewards_chosen,
            eval_rewards_rejected: m.rewards_rejected,
            eval_reward_accuracy: m.reward_accuracy,
            eval_reward_margin: m.reward_margin,
        }
    }
}

/// Reads all rows (a missing file is empty; a torn last line from a crash is skipped).
pub fn read(path: &Path) -> Vec<MetricsRow> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Keeps only rows up to `step` (after a resume, later rows are recomputed).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let rows: Vec<MetricsRow> = read(path).into_iter().filter(|r| r.step <= step).collect();
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(&r).unwrap_or_default());
        text.push('\n');
    }
    lorakit_adapter::fsutil::atomic_write(path, text.as_bytes())?;
    Ok(())
}

pub fn append(path: &Path, row: &MetricsRow) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, e))?;
    let line = serde_json::to_string(row).map_err(|e| TrainError::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| TrainError::io(path, e))
}

/// A small self-contained SVG of train and eval loss against step.
pub fn loss_svg(rows: &[MetricsRow]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let train: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.step as f64, r.loss?)))
        .collect();
    let eval: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.step as f64, r.eval_loss?)))
        .collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).collect();
    let max_x = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = all.iter().map(|p| p.1).fold(f64::MIN, f64::max).max(1e-9);
    let min_y = all.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(max_y);
    let span = (max_y - min_y).max(1e-9);
    let x = |s: f64| pad + (w - 2.0 * pad) * s / max_x;
    let y = |l: f64| h - pad - (h - 2.0 * pad) * (l - min_y) / span;
    let line = |pts: &[(f64, f64)], color: &str| {
        let p: Vec<String> = pts
            .iter()
            .map(|(s, l)| format!("{:.1},{:.1}", x(*s), y(*l)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            p.join(" ")
        )
    };
    let dots: String = eval
        .iter()
        .map(|(s, l)| {
            format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>",
                x(*s),
                y(*l)
            )
        })
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\
<text x=\"{pad}\" y=\"{t}\">loss (train: blue, eval: red)</text>\
<text x=\"4\" y=\"{pad}\">{max_y:.3}</text><text x=\"4\" y=\"{b}\">{min_y:.3}</text>\
<text x=\"{r}\" y=\"{lb}\" text-anchor=\"end\">step {max_x}</text>{}{}{dots}</svg>\n",
        line(&train, "#1f77b4"),
        line(&eval, "#d62728"),
        b = h - pad,
        r = w - pad,
        t = pad - 16.0,
        lb = h - pad + 20.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_point_per_logged_value() {
        let rows: Vec<MetricsRow> = (1..=4)
            .map(|s| MetricsRow {
                step: s,
                epoch: 0.0,
                loss: Some(5.0 - s as f64),
                lr: None,
                tokens_per_s: None,
                examples_per_s: None,
                rewards: None,
                eval_rewards: None,
                eval_loss: (s % 2 == 0).then_some(4.0),
                eval_perplexity: None,
                eval_accuracy: None,
                peak_rss_mb: None,
            })
            .collect();
        let svg = loss_svg(&rows);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
        let train_points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(train_points.split(' ').count(), 4);
    }

    #[test]
    fn truncation_drops_rows_after_the_resume_step_and_torn_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.jsonl");
        for s in 1..=5 {
            append(
                &p,
                &MetricsRow {
                    step: s,
                    epoch: 0.0,
                    loss: Some(1.0),
                    lr: None,
                    tokens_per_s: None,
                    examples_per_s: None,
                    rewards: None,
                    eval_rewards: None,
                    eval_loss: None,
                    eval_perplexity: None,
                    eval_accuracy: None,
                    peak_rss_mb: None,
                },
            )
            .unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"step\": 6, \"ep")
            .unwrap();
        truncate_after(&p, 3).unwrap();
        assert_eq!(
            read(&p).iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }
}
