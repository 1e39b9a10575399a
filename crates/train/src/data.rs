//! Data sets: JSON Lines in three formats, tokenised into ids plus a per-token loss mask.
//!
//! - `completion` `{"text"}`: tokenizer's own special tokens (e.g. BOS) + text + EOS; loss on
//!   every token.
//! - `instruction` `{"instruction", "input"?, "output"}`: the prompt template below, then
//!   output + EOS; loss on the output and EOS unless `train_on_inputs`.
//! - `chat` `{"messages": [{"role", "content"}]}`: rendered with the model's chat template; loss
//!   on every assistant turn including its end-of-turn token unless `train_on_inputs`.
use crate::error::{Result, TrainError};
use crate::recipe::DataFormat;
use crate::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::Path;

/// The prompt of the `instruction` format (Alpaca's layout). `{input}` lines are left out when
/// the example has no input.
pub const INSTRUCTION_TEMPLATE: &str =
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

/// One tokenised example: `targets[i]` says whether token i is predicted in the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
    /// The class index (format `classification`); `None` for language-model examples.
    pub label: Option<u32>,
}

/// A tokenised data set and what happened on the way.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub truncated: usize,
    /// Examples left with no target token after truncation, dropped.
    pub dropped: usize,
}

impl Dataset {
    pub fn target_tokens(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.targets.iter().skip(1).filter(|t| **t).count())
            .sum()
    }
}

/// Longest JSON line accepted (guards memory before parsing).
const MAX_LINE_BYTES: usize = 16 << 20;

/// Why `path` cannot be a data file, if it cannot: missing, a directory, or not a regular file
/// (a device such as /dev/zero or a pipe would be read without end).
pub fn not_a_data_file(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("{} does not exist", path.display()))
        }
        Err(e) => Some(format!("{}: {e}", path.display())),
        Ok(m) if m.is_dir() => Some(format!(
            "{} is a directory, expected a JSON Lines file",
            path.display()
        )),
        Ok(m) if !m.is_file() => Some(format!(
            "{} is not a regular file (a device or a pipe?), expected a JSON Lines file",
            path.display()
        )),
        Ok(_) => None,
    }
}

/// The whole of a data file, refusing anything but a regular file.
pub(crate) fn read_data_file(path: &Path) -> Result<Vec<u8>> {
    if let Some(why) = not_a_data_file(path) {
        return Err(TrainError::DataFile {
            file: path.into(),
            message: why,
        });
    }
    std::fs::read(path).map_err(|e| TrainError::io(path, e))
}

/// Reads and tokenises `path`.
pub fn load(
    path: &Path,
    format: DataFormat,
    tok: &TextTokenizer,
    max_seq_len: usize,
    train_on_inputs: bool,
) -> Result<Dataset> {
    let bytes = read_data_file(path)?;
    parse(bytes, path, format, tok, max_seq_len, train_on_inputs)
}

/// The records of a JSON Lines file as (line number, value), blank lines skipped. Invalid UTF-8,
/// over-long lines and invalid JSON are errors naming `path` and the line.
pub(crate) fn records(bytes: Vec<u8>, path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        TrainError::Data {
            file: path.into(),
            line,
            message: "not valid UTF-8".into(),
        }
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| TrainError::Data {
            file: path.into(),
            line: i + 1,
            message,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(err(format!("line is longer than {MAX_LINE_BYTES} bytes")));
        }
        let v = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// [`records`] of the file at `path`.
pub(crate) fn read_records(path: &Path) -> Result<Vec<(usize, Value)>> {
    records(read_data_file(path)?, path)
}

/// Parses and tokenises JSON Lines `bytes`; `path` names them in messages.
pub fn parse(
    bytes: Vec<u8>,
    path: &Path,
    format: DataFormat,
    tok: &TextTokenizer,
    max_seq_len: usize,
    train_on_inputs: bool,
) -> Result<Dataset> {
    let mut ds = Dataset::default();
    let template = match format {
        DataFormat::Chat => Some(ChatTemplate::new(tok)?),
        _ => None,
    };
    for (n, v) in records(bytes, path)? {
        let err = |message: String| TrainError::Data {
            file: path.into(),
            line: n,
            message,
        };
        let mut ex = tokenise(
            &v,
            format,
            tok,
            template.as_ref(),
            train_on_inputs,
            max_seq_len,
        )
        .map_err(err)?;
        if ex.ids.len() > max_seq_len {
            ex.ids.truncate(max_seq_len);
            ex.targets.truncate(max_seq_len);
            ds.truncated += 1;
        }
        if ex.targets.iter().skip(1).any(|t| *t) {
            ds.examples.push(ex);
        } else {
            ds.dropped += 1;
        }
    }
    if ds.examples.is_empty() {
        return Err(TrainError::DataFile {
            file: path.into(),
            message: if ds.dropped > 0 {
                format!("all {} examples have no tokens to learn after truncation to {max_seq_len} tokens", ds.dropped)
            } else {
                "no examples (the file is empty)".into()
            },
        });
    }
    Ok(ds)
}

/// One record as an example (`template` is needed by the chat format).
/// Tokens past `max_tokens` may be left out (the caller truncates there).
pub(crate) fn tokenise(
    v: &Value,
    format: DataFormat,
    tok: &TextTokenizer,
    template: Option<&ChatTemplate>,
    train_on_inputs: bool,
    max_tokens: usize,
) -> std::result::Result<Example, String> {
    match format {
        DataFormat::Completion => completion(v, tok),
        DataFormat::Instruction => instruction(v, tok, train_on_inputs),
        DataFormat::Chat => template
            .map(|t| t.example(v, tok, train_on_inputs, max_tokens))
            .unwrap_or(Err("no chat template".into())),
        DataFormat::Classification => Err("classification data is read by load_labelled".into()),
        DataFormat::Preference => Err("preference pairs are read by preference::load".into()),
    }
}

/// Tokens and their byte offsets for at least the first `max_tokens` tokens of `text`: a text far
/// longer than `max_tokens` tokens could be is tokenised only up to a generous byte budget
/// (64 bytes a token), and whole whenever that prefix does not yield comfortably more than
/// `max_tokens` tokens, so the kept tokens are those of the whole text.
fn encode_prefix(
    tok: &TextTokenizer,
    text: &str,
    max_tokens: usize,
) -> std::result::Result<crate::tokenizer::IdsWithOffsets, String> {
    let budget = max_tokens.saturating_mul(64).max(1 << 16);
    if text.len() > budget {
        let mut cut = budget;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let (ids, offsets) = tok
            .encode_with_offsets(&text[..cut])
            .map_err(|e| e.to_string())?;
        if ids.len() > max_tokens.saturating_add(64) {
            return Ok((ids, offsets));
        }
    }
    tok.encode_with_offsets(text).map_err(|e| e.to_string())
}

/// The sorted distinct `label` values of a `classification` file (the default label set).
pub fn scan_labels(path: &Path) -> Result<Vec<String>> {
    let mut labels = std::collections::BTreeSet::new();
    for (line, v) in read_records(path)? {
        let label = field(&v, "label").map_err(|message| TrainError::Data {
            file: path.into(),
            line,
            message,
        })?;
        labels.insert(label.to_string());
    }
    if labels.len() < 2 {
        return Err(TrainError::DataFile {
            file: path.into(),
            message: format!("classification needs at least two distinct labels, found {labels:?}"),
        });
    }
    Ok(labels.into_iter().collect())
}

/// Reads a `classification` file `{"text", "label"}`: the text with the tokenizer's special
/// tokens ([CLS] … [SEP]), truncated to `max_seq_len`, and the label's index in `labels`.
pub fn load_labelled(
    path: &Path,
    tok: &TextTokenizer,
    max_seq_len: usize,
    labels: &[String],
) -> Result<Dataset> {
    let mut ds = Dataset::default();
    for (line, v) in read_records(path)? {
        let err = |message: String| TrainError::Data {
            file: path.into(),
            line,
            message,
        };
        let text = field(&v, "text").map_err(err)?;
        if text.trim().is_empty() {
            return Err(err("\"text\" is empty".into()));
        }
        let label = field(&v, "label").map_err(err)?;
        let index = labels.iter().position(|l| l == label).ok_or_else(|| {
            err(format!(
                "label {label:?} is not in the label set ({})",
                labels.join(", ")
            ))
        })?;
        let mut ids = tok.encode(text, true)?;
        if ids.len() > max_seq_len {
            ids.truncate(max_seq_len);
            ds.truncated += 1;
        }
        ds.examples.push(Example {
            targets: vec![false; ids.len()],
            ids,
            label: Some(index as u32),
        });
    }
    if ds.examples.is_empty() {
        return Err(TrainError::DataFile {
            file: path.into(),
            message: "no examples (the file is empty)".into(),
        });
    }
    Ok(ds)
}

fn field<'a>(v: &'a Value, name: &str) -> std::result::Result<&'a str, String> {
    match v.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("\"{name}\" must be a string, got {other}")),
        None => Err(format!("missing field \"{name}\"")),
    }
}

fn with_eos(mut ids: Vec<u32>, tok: &TextTokenizer) -> Vec<u32> {
    if let Some(e) = tok.eos_id {
        if ids.last() != Some(&e) {
            ids.push(e);
        }
    }
    ids
}

fn completion(v: &Value, tok: &TextTokenizer) -> std::result::Result<Example, String> {
    let text = field(v, "text")?;
    if text.trim().is_empty() {
        return Err("\"text\" is empty".into());
    }
    let ids = with_eos(tok.encode(text, true).map_err(|e| e.to_string())?, tok);
    let targets = vec![true; ids.len()];
    Ok(Example {
        ids,
        targets,
        label: None,
    })
}

/// The prompt for one instruction example.
pub fn instruction_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        INSTRUCTION_TEMPLATE
            .replace("### Input:\n{input}\n\n", "")
            .replace("{instruction}", instruction)
    } else {
        INSTRUCTION_TEMPLATE
            .replace("{instruction}", instruction)
            .replace("{input}", input)
    }
}

fn instruction(
    v: &Value,
    tok: &TextTokenizer,
    train_on_inputs: bool,
) -> std::result::Result<Example, String> {
    let ins = field(v, "instruction")?;
    let input = match v.get("input") {
        None | Some(Value::Null) => "",
        Some(_) => field(v, "input")?,
    };
    let output = field(v, "output")?;
    if output.trim().is_empty() {
        return Err("\"output\" is empty".into());
    }
    let prompt = tok
        .encode(&instruction_prompt(ins, input), true)
        .map_err(|e| e.to_string())?;
    let response = with_eos(tok.encode(output, false).map_err(|e| e.to_string())?, tok);
    let mut targets = vec![train_on_inputs; prompt.len()];
    targets.extend(std::iter::repeat_n(true, response.len()));
    let mut ids = prompt;
    ids.extend(response);
    Ok(Example {
        ids,
        targets,
        label: None,
    })
}

/// The steps (minijinja "fuel") one rendering may take: a fixed allowance plus an allowance per
/// message. Real templates take tens of steps a message, so any conversation renders, while a
/// template that loops without bound stops within a second or so.
const TEMPLATE_FUEL: u64 = 5_000_000;
const TEMPLATE_FUEL_PER_MESSAGE: u64 = 500;

/// The most text one rendering may produce.
const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// A rendering's output, refused past [`TEMPLATE_MAX_OUTPUT`] bytes.
#[derive(Default)]
struct BoundedText(Vec<u8>);

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_MAX_OUTPUT {
            self.0.resize(TEMPLATE_MAX_OUTPUT, 0);
            return Err(std::io::Error::other("output too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    /// Behind a lock because each rendering sets its own fuel on the environment.
    env: std::sync::Mutex<minijinja::Environment<'static>>,
}

impl ChatTemplate {
    pub fn new(tok: &TextTokenizer) -> Result<Self> {
        let source = tok.chat_template.clone().ok_or_else(|| TrainError::Template {
            file: tok.config_file.clone(),
            message: "the model has no `chat_template` (a base model?), which chat data (data.format: chat) and `generate --chat` need; use data.format: instruction or completion, or `generate --prompt`".into(),
        })?;
        Self::from_source(source, &tok.config_file)
    }

    /// Compiles template `source`; `file` names it in errors.
    pub fn from_source(source: String, file: &Path) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| TrainError::Template {
                file: file.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(ChatTemplate {
            env: std::sync::Mutex::new(env),
        })
    }

    /// Renders `messages` (with a generation prompt if asked).
    pub fn render(
        &self,
        messages: &[Value],
        tok: &TextTokenizer,
        generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        // Templates come with downloaded models: bound the work one rendering may do
        let fuel = TEMPLATE_FUEL
            .saturating_add(TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64));
        let mut env = self.env.lock().unwrap_or_else(|p| p.into_inner());
        env.set_fuel(Some(fuel));
        let t = env.get_template("chat").map_err(|e| e.to_string())?;
        let mut out = BoundedText::default();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => generation_prompt,
            bos_token => tok.bos.clone().unwrap_or_default(),
            eos_token => tok.eos.clone().unwrap_or_default(),
        };
        let rendered = match t.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.0).map_err(|e| format!("chat template failed: {e}")),
            Err(_) if out.0.len() >= TEMPLATE_MAX_OUTPUT => Err(format!(
                "chat template failed: its output passed {} MiB",
                TEMPLATE_MAX_OUTPUT >> 20
            )),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(format!(
                "chat template failed: it ran more than {fuel} steps for {} messages (a template loop without bound?)",
                messages.len()
            )),
            Err(e) => Err(format!("chat template failed: {e}")),
        };
        rendered
    }

    /// One conversation as an example. Only its first `max_tokens` tokens can reach the model,
    /// so assistant turns that start past them are not located (rendering each turn's prefix
    /// costs the length of the conversation so far) and a very long rendering is tokenised
    /// only as far as needed.
    pub(crate) fn example(
        &self,
        v: &Value,
        tok: &TextTokenizer,
        train_on_inputs: bool,
        max_tokens: usize,
    ) -> std::result::Result<Example, String> {
        let messages = v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("missing array \"messages\"")?;
        if messages.is_empty() {
            return Err("\"messages\" is empty".into());
        }
        for (i, m) in messages.iter().enumerate() {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or(format!("messages[{i}] has no string \"role\""))?;
            if !matches!(role, "system" | "user" | "assistant") {
                return Err(format!(
                    "messages[{i}].role is {role:?}, expected system, user or assistant"
                ));
            }
            m.get("content")
                .and_then(Value::as_str)
                .ok_or(format!("messages[{i}] has no string \"content\""))?;
        }
        if !messages.iter().any(|m| m["role"] == "assistant") {
            return Err("no assistant message to learn from".into());
        }
        let full = self.render(messages, tok, false)?;
        let (ids, offsets) = encode_prefix(tok, &full, max_tokens)?;
        // the end of the last token that can be kept: turns starting past it are cut off
        let limit = offsets
            .get(max_tokens.saturating_sub(1))
            .map(|o| o.1)
            .unwrap_or(full.len());
        // Assistant spans: from the end of the prompt that asks for turn i to the end of turn i.
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m["role"] == "assistant" {
                let start = self.render(&messages[..i], tok, true)?.len();
                if start >= limit || spans.len() > max_tokens {
                    break;
                }
                let end = self.render(&messages[..=i], tok, false)?.len();
                if !full.is_char_boundary(start) || start > end || end > full.len() {
                    return Err("the chat template does not render conversations prefix by prefix; cannot locate assistant turns".into());
                }
                spans.push((start, end));
            }
        }
        let targets = offsets
            .iter()
            .map(|(s, e)| {
                train_on_inputs || spans.iter().any(|(a, b)| *s >= *a && *s < *b && *e <= *b)
            })
            .collect();
        Ok(Example {
            ids,
            targets,
            label: None,
        })
    }
}
