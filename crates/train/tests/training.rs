//! The training loop on the committed tiny model: it learns, leaves the base untouched, and a
//! run interrupted and resumed ends bit-identical to an uninterrupted one.
use lorakit_train::data::{self, Example};
use lorakit_train::eval::EvalResult;
use lorakit_train::{train, DataFormat, Recipe, Reporter, StepReport, TextTokenizer, TrainOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn recipe(out: &Path, extra: &[&str]) -> Recipe {
    let r = root();
    let text = format!(
        "model:\n  path: {m}\ndata:\n  train: {d}/capitals-train.jsonl\n  eval: {d}/capitals-train.jsonl\n  format: completion\n  max_seq_len: 32\n\
lora:\n  r: 4\n  lora_alpha: 8\n  lora_dropout: 0.1\n  target_modules: all-linear\ntrain:\n  max_steps: 12\n  batch_size: 8\n  learning_rate: 3.0e-3\n  warmup_steps: 2\n  save_every: 4\n  eval_every: 6\n  seed: 3\noutput:\n  dir: {o}\n",
        m = r.join("examples/tiny-llama").display(),
        d = r.join("examples/data").display(),
        o = out.display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Recipe::parse(&text, "test.yaml", &overrides).unwrap()
}

#[derive(Default)]
struct Quiet {
    evals: Vec<(usize, f64)>,
    stop_at: Option<(usize, Arc<AtomicBool>)>,
}

impl Reporter for Quiet {
    fn step(&mut self, r: &StepReport) {
        if let Some((k, flag)) = &self.stop_at {
            if r.step == *k {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
    fn eval(&mut self, step: usize, r: &EvalResult, _best: bool) {
        self.evals.push((step, r.loss));
    }
}

fn opts(resume: bool) -> TrainOptions {
    TrainOptions {
        resume,
        force: false,
        recipe_file: None,
        stop: Arc::new(AtomicBool::new(false)),
    }
}

fn sha(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn memorises_a_small_data_set_without_touching_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base_file = root().join("examples/tiny-llama/model.safetensors");
    let before = sha(&base_file);
    let r = recipe(
        &tmp.path().join("run"),
        &[
            "train.max_steps=40",
            "train.eval_every=40",
            "lora.lora_dropout=0.0",
            "train.learning_rate=1.0e-2",
        ],
    );
    let mut rep = Quiet::default();
    let s = train(&r, &opts(false), &mut rep).unwrap();
    assert_eq!(s.steps, 40);
    // the first evaluation is of the untouched base model (step 0)
    assert_eq!(rep.evals.first().unwrap().0, 0);
    let (first, last) = (rep.evals.first().unwrap().1, rep.evals.last().unwrap().1);
    // evaluated on the training data: the loss must fall by a large margin
    assert!(last < first * 0.5, "eval loss {first} -> {last}");
    assert!(s.last_loss.unwrap() < s.first_loss.unwrap() * 0.5);
    assert_eq!(sha(&base_file), before, "the base model file changed");
    let out = tmp.path().join("run");
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "last/adapter_model.safetensors",
        "metrics.jsonl",
        "recipe.yaml",
        "loss.svg",
        "checkpoints/step-40/optimizer.safetensors",
        "checkpoints/step-40/state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // metrics: one row per step with the required keys, eval_loss on eval steps
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 41);
    assert!(rows[0]["step"] == 0 && rows[0]["eval_loss"].is_number());
    for (i, row) in rows.iter().enumerate().skip(1) {
        assert_eq!(row["step"], i);
        for k in ["epoch", "loss", "lr", "tokens_per_s"] {
            assert!(row[k].is_number(), "row {i} lacks {k}");
        }
    }
    // evaluations at every epoch end (4 steps) and at the end; none in between
    assert!(
        rows[40]["eval_loss"].is_number()
            && rows[36]["eval_loss"].is_number()
            && rows[39].get("eval_loss").is_none()
    );
    // the saved recipe is the resolved one and parses again
    Recipe::load(&out.join("recipe.yaml"), &[]).unwrap();
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    train(&recipe(&full, &[]), &opts(false), &mut Quiet::default()).unwrap();

    for stop in [1usize, 5, 8] {
        let part = tmp.path().join(format!("part-{stop}"));
        let flag = Arc::new(AtomicBool::new(false));
        let mut rep = Quiet {
            stop_at: Some((stop, flag.clone())),
            ..Default::default()
        };
        let s = train(
            &recipe(&part, &[]),
            &TrainOptions {
                resume: false,
                force: false,
                recipe_file: None,
                stop: flag,
            },
            &mut rep,
        )
        .unwrap();
        assert!(s.interrupted && s.steps == stop, "stopped at {}", s.steps);
        assert!(part
            .join(format!("checkpoints/step-{stop}/state.json"))
            .is_file());
        let s = train(&recipe(&part, &[]), &opts(true), &mut Quiet::default()).unwrap();
        assert_eq!(s.steps, 12);
        for f in [
            "last/adapter_model.safetensors",
            "adapter/adapter_model.safetensors",
            "checkpoints/step-12/optimizer.safetensors",
        ] {
            assert!(
                sha(&full.join(f)) == sha(&part.join(f)),
                "stop at {stop}: {f} differs"
            );
        }
        assert_eq!(
            std::fs::read_to_string(full.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count(),
            std::fs::read_to_string(part.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count()
        );
    }
}

/// `train.gradient_checkpointing` recomputes layers in the backward pass (LoRA dropout on in
/// this recipe): the same run, to float rounding, in losses, evaluations and the adapter.
#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut rep = Quiet::default();
        let s = train(&recipe(&out, extra), &opts(false), &mut rep).unwrap();
        let adapter = candle_core::safetensors::load(
            out.join("adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        (s, rep.evals, adapter)
    };
    let (plain, plain_evals, plain_adapter) = run("plain", &[]);
    let (ckpt, ckpt_evals, ckpt_adapter) = run("ckpt", &["train.gradient_checkpointing=true"]);
    assert_eq!(plain.steps, ckpt.steps);
    let (a, b) = (plain.last_loss.unwrap(), ckpt.last_loss.unwrap());
    assert!((a - b).abs() < 1e-4 * a.abs(), "last loss {a} vs {b}");
    assert!(plain.first_loss.unwrap() > a, "the run did not learn");
    assert_eq!(plain_evals.len(), ckpt_evals.len());
    for ((s1, l1), (s2, l2)) in plain_evals.iter().zip(&ckpt_evals) {
        assert_eq!(s1, s2);
        assert!(
            (l1 - l2).abs() < 1e-4 * l1.abs(),
            "eval at step {s1}: {l1} vs {l2}"
        );
    }
    assert_eq!(plain_adapter.len(), ckpt_adapter.len());
    for (name, t) in &plain_adapter {
        let d = lorakit_ops::compare::max_abs_diff(t, &ckpt_adapter[name]).unwrap();
        assert!(d < 1e-4, "{name} differs by {d}");
    }
}

#[test]
fn output_dir_and_resume_mistakes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let e = train(&recipe(&out, &[]), &opts(true), &mut Quiet::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
    train(
        &recipe(&out, &["train.max_steps=2"]),
        &opts(false),
        &mut Quiet::default(),
    )
    .unwrap();
    let e = train(
        &recipe(&out, &["train.max_steps=2"]),
        &opts(false),
        &mut Quiet::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--resume") && e.contains("not empty"), "{e}");
    let e = train(
        &recipe(&out, &["train.max_steps=4", "lora.r=8"]),
        &opts(true),
        &mut Quiet::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("different lora"), "{e}");
}

fn tok() -> TextTokenizer {
    TextTokenizer::from_model_dir(&root().join("examples/tiny-llama")).unwrap()
}

fn decode_targets(t: &TextTokenizer, ex: &Example, vocab: &tokenizers::Tokenizer) -> String {
    let ids: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.targets)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    let _ = t;
    vocab.decode(&ids, false).unwrap()
}

#[test]
fn each_format_masks_exactly_the_response_tokens() {
    let t = tok();
    let raw = tokenizers::Tokenizer::from_file(root().join("examples/tiny-llama/tokenizer.json"))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, line: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("{line}\n")).unwrap();
        p
    };
    // completion: every token, EOS appended
    let p = write("c.jsonl", r#"{"text": "The capital of Peru is Lima."}"#);
    let ds = data::load(&p, DataFormat::Completion, &t, 64, false).unwrap();
    let ex = &ds.examples[0];
    assert!(ex.targets.iter().all(|x| *x));
    assert_eq!(
        raw.decode(&ex.ids, false).unwrap(),
        "The capital of Peru is Lima.<|im_end|>"
    );

    // instruction: only the output and EOS, unless train_on_inputs
    let p = write(
        "i.jsonl",
        r#"{"instruction": "Name the capital city.", "input": "Peru", "output": "Lima"}"#,
    );
    let ex = data::load(&p, DataFormat::Instruction, &t, 64, false)
        .unwrap()
        .examples
        .remove(0);
    assert_eq!(decode_targets(&t, &ex, &raw), "Lima<|im_end|>");
    assert_eq!(raw.decode(&ex.ids, false).unwrap(), "### Instruction:\nName the capital city.\n\n### Input:\nPeru\n\n### Response:\nLima<|im_end|>");
    let ex = data::load(&p, DataFormat::Instruction, &t, 64, true)
        .unwrap()
        .examples
        .remove(0);
    assert!(ex.targets.iter().all(|x| *x));

    // chat: assistant turns with their end-of-turn token, nothing else
    let p = write(
        "h.jsonl",
        r#"{"messages": [{"role": "system", "content": "Answer with the city only."}, {"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "And of Chile?"}, {"role": "assistant", "content": "Santiago"}]}"#,
    );
    let ex = data::load(&p, DataFormat::Chat, &t, 256, false)
        .unwrap()
        .examples
        .remove(0);
    assert_eq!(
        decode_targets(&t, &ex, &raw),
        "Lima<|im_end|>\nSantiago<|im_end|>\n"
    );
    assert!(raw.decode(&ex.ids, false).unwrap().starts_with(
        "<|im_start|>system\nAnswer with the city only.<|im_end|>\n<|im_start|>user\n"
    ));

    // truncation is counted
    let p = write(
        "long.jsonl",
        r#"{"text": "The capital of Peru is Lima. The capital of Chile is Santiago."}"#,
    );
    let ds = data::load(&p, DataFormat::Completion, &t, 5, false).unwrap();
    assert_eq!((ds.truncated, ds.examples[0].ids.len()), (1, 5));
}

#[test]
fn bad_data_lines_are_named_with_their_line_number() {
    let t = tok();
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, DataFormat, &[u8], &str)] = &[
        (
            "bad-json",
            DataFormat::Completion,
            b"{\"text\": \"ok\"}\n{\"text\": \n",
            ":2: invalid JSON",
        ),
        (
            "missing",
            DataFormat::Completion,
            b"{\"txt\": \"ok\"}\n",
            ":1: missing field \"text\"",
        ),
        (
            "empty-text",
            DataFormat::Completion,
            b"{\"text\": \"  \"}\n",
            ":1: \"text\" is empty",
        ),
        (
            "wrong-type",
            DataFormat::Instruction,
            b"{\"instruction\": 3, \"output\": \"x\"}\n",
            ":1: \"instruction\" must be a string",
        ),
        (
            "bad-role",
            DataFormat::Chat,
            b"{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n",
            ":1: messages[0].role is \"robot\"",
        ),
        (
            "no-assistant",
            DataFormat::Chat,
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
            "no assistant message",
        ),
        (
            "utf8",
            DataFormat::Completion,
            b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n",
            ":2: not valid UTF-8",
        ),
        ("empty", DataFormat::Completion, b"\n\n", "no examples"),
    ];
    for (name, fmt, bytes, expect) in cases {
        let p = tmp.path().join(format!("{name}.jsonl"));
        std::fs::write(&p, bytes).unwrap();
        let e = data::load(&p, *fmt, &t, 64, false).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{name}.jsonl")) && e.contains(expect),
            "{name}: {e}"
        );
    }
}

#[test]
fn early_stopping_keeps_the_best_adapter_when_eval_loss_turns_up() {
    // Held-out countries: the eval loss falls, then rises as the adapter memorises the train set.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let eval = root().join("examples/data/capitals-eval.jsonl");
    let r = recipe(
        &out,
        &[
            &format!("data.eval={}", eval.display()),
            "train.max_steps=400",
            "train.eval_every=2",
            "train.early_stopping_patience=3",
            "train.learning_rate=2.0e-2",
            "lora.lora_dropout=0.0",
            "train.save_every=1000",
        ],
    );
    let mut rep = Quiet::default();
    let s = train(&r, &opts(false), &mut rep).unwrap();
    assert!(s.stopped_early && s.steps < 400, "ran {} steps", s.steps);
    let (best_step, best) = s.best_eval.unwrap();
    assert_eq!(
        best,
        rep.evals.iter().map(|e| e.1).fold(f64::INFINITY, f64::min)
    );
    // the three evaluations after the best one were all worse
    let after: Vec<f64> = rep
        .evals
        .iter()
        .filter(|e| e.0 > best_step)
        .map(|e| e.1)
        .collect();
    assert_eq!(after.len(), 3, "{:?}", rep.evals);
    assert!(after.iter().all(|l| *l >= best));
    // adapter/ holds the best weights: evaluating it gives the best loss
    let tok = TextTokenizer::from_model_dir(&root().join("examples/tiny-llama")).unwrap();
    let ds = data::load(&eval, DataFormat::Completion, &tok, 32, false).unwrap();
    let adapter = lorakit_adapter::PeftAdapter::load(&out.join("adapter")).unwrap();
    let (model, _) = lorakit_models::BaseModel::open(&root().join("examples/tiny-llama"))
        .unwrap()
        .load_causal_lm(
            lorakit_adapter::Adapters::Loaded(adapter),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
    let model = lorakit_train::task_model::TaskModel::CausalLm(model);
    let e =
        lorakit_train::eval::evaluate(&model, &ds, tok.pad_id, 8, None, &candle_core::Device::Cpu)
            .unwrap();
    assert!((e.loss - best).abs() < 1e-5, "{} vs {best}", e.loss);
}

#[test]
fn eval_split_holds_out_a_seeded_fraction() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(
        &tmp.path().join("run"),
        &[
            "data.eval=null",
            "data.eval_split=0.25",
            "train.max_steps=1",
        ],
    );
    let s = train(&r, &opts(false), &mut Quiet::default()).unwrap();
    assert_eq!((s.train_examples, s.eval_examples), (24, 8));
}
