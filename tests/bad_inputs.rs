//! The catalogue of bad inputs. Every case runs the `lorakit` binary and asserts: exit status 1
//! (never a panic's 101), one paragraph on stderr that starts with `error:` and names the file and
//! the field or line at fault, no backtrace, and no output file or directory left behind.
mod common;
use common::root;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A scratch directory with a copy of the tiny model, its data and a recipe.
struct Scratch {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir(dir.join("model")).unwrap();
        for e in std::fs::read_dir(root().join("examples/tiny-llama")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join("model").join(e.file_name())).unwrap();
        }
        std::fs::copy(
            root().join("examples/data/capitals-train.jsonl"),
            dir.join("train.jsonl"),
        )
        .unwrap();
        std::fs::copy(
            root().join("examples/data/capitals-eval.jsonl"),
            dir.join("eval.jsonl"),
        )
        .unwrap();
        let s = Scratch { _tmp: tmp, dir };
        s.write("recipe.yaml", &s.recipe(""));
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    /// A valid recipe with `extra` appended (cases mostly edit its text instead: YAML forbids
    /// duplicate keys).
    fn recipe(&self, extra: &str) -> String {
        format!(
            "model:\n  path: {d}/model\ndata:\n  train: {d}/train.jsonl\n  eval: {d}/eval.jsonl\n  format: completion\n  max_seq_len: 32\nlora:\n  r: 4\n  target_modules: [q_proj, v_proj]\ntrain:\n  max_steps: 2\n  batch_size: 8\noutput:\n  dir: {d}/out\n{extra}",
            d = self.dir.display()
        )
    }

    fn lorakit(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .current_dir(&self.dir)
            .args(args)
            .output()
            .unwrap()
    }

    /// Entries of the scratch directory (for "nothing left behind").
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Runs one case and checks the universal promises plus `expect` (substrings of stderr).
fn check(name: &str, s: &Scratch, args: &[&str], expect: &[&str]) {
    let before = s.entries();
    let o = s.lorakit(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "[{name}] exit status {:?}; stderr: {err}",
        o.status.code()
    );
    assert!(err.starts_with("error: "), "[{name}] {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace") && !err.contains("RUST_BACKTRACE"),
        "[{name}] {err}"
    );
    assert!(
        !err.trim_end().contains("\n\n"),
        "[{name}] more than one paragraph: {err}"
    );
    for e in expect {
        assert!(err.contains(e), "[{name}] expected {e:?} in: {err}");
    }
    let after = s.entries();
    assert_eq!(before, after, "[{name}] files appeared or vanished");
}

fn train(s: &Scratch) -> Vec<String> {
    vec!["train".into(), s.path("recipe.yaml").display().to_string()]
}

fn run_train(name: &str, s: &Scratch, recipe: &str, expect: &[&str]) {
    s.write("recipe.yaml", recipe);
    let args = train(s);
    check(
        name,
        s,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        expect,
    );
}

#[test]
fn recipes() {
    let s = Scratch::new();
    let ok = s.recipe("");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "yaml syntax",
            "model: [\n  path: x\n".into(),
            vec!["recipe.yaml", "line"],
        ),
        (
            "unknown top-level key",
            ok.replace("model:", "modle:"),
            vec!["recipe.yaml", "modle", "did you mean model?", "line 1"],
        ),
        (
            "misspelt nested key",
            ok.replace("  batch_size: 8", "  batch_sise: 8"),
            vec!["train.batch_sise", "did you mean batch_size?", "line 13"],
        ),
        (
            "wrong type",
            ok.replace("  batch_size: 8", "  batch_size: many"),
            vec!["train.batch_size", "line"],
        ),
        (
            "rank zero",
            ok.replace("  r: 4", "  r: 0"),
            vec!["lora.r", "at least 1"],
        ),
        (
            "negative learning rate",
            ok.replace("  max_steps: 2", "  max_steps: 2\n  learning_rate: -0.1"),
            vec!["train.learning_rate", "positive"],
        ),
        (
            "missing train file",
            ok.replace("train.jsonl", "nope.jsonl"),
            vec!["data.train", "nope.jsonl", "does not exist"],
        ),
        (
            "missing eval file",
            ok.replace("eval.jsonl", "gone.jsonl"),
            vec!["data.eval", "gone.jsonl"],
        ),
        ("empty recipe", "\n".into(), vec!["recipe.yaml", "empty"]),
        (
            "missing output section",
            ok.split("output:").next().unwrap().to_string(),
            vec!["recipe.yaml", "output"],
        ),
        (
            "bad format",
            ok.replace("format: completion", "format: poetry"),
            vec!["data.format", "poetry"],
        ),
        (
            "eval_split out of range",
            ok.replace(
                &format!("  eval: {}/eval.jsonl\n", s.dir.display()),
                "  eval_split: 1.5\n",
            ),
            vec!["data.eval_split", "between 0 and 1"],
        ),
        (
            "bad dtype",
            ok.replace("path: ", "dtype: fp8\n  path: "),
            vec!["model.dtype", "fp8"],
        ),
        (
            "warmup ratio",
            ok.replace("  max_steps: 2", "  max_steps: 2\n  warmup_ratio: 1.0"),
            vec!["train.warmup_ratio"],
        ),
        (
            "early stopping without eval",
            ok.replace(&format!("  eval: {}/eval.jsonl\n", s.dir.display()), "")
                .replace(
                    "  max_steps: 2",
                    "  max_steps: 2\n  early_stopping_patience: 2",
                ),
            vec!["train.early_stopping_patience", "evaluation data"],
        ),
        (
            "missing model dir",
            ok.replace("/model\n", "/no-model\n"),
            vec!["no-model", "not a directory"],
        ),
        (
            "dropout out of range",
            ok.replace("  r: 4", "  r: 4\n  lora_dropout: 1.5"),
            vec!["lora.lora_dropout"],
        ),
        (
            "bad target regex",
            ok.replace("[q_proj, v_proj]", "\"(unclosed\""),
            vec!["lora.target_modules", "regex"],
        ),
        (
            "target matching nothing",
            ok.replace("[q_proj, v_proj]", "[q_proj, qkv]"),
            vec!["qkv", "matched no module"],
        ),
        (
            "bad device",
            ok.replace("path: ", "device: tpu\n  path: "),
            vec!["model.device", "tpu"],
        ),
        (
            "sections must be mappings",
            ok.replace("train:\n  max_steps: 2\n  batch_size: 8\n", "train: 7\n"),
            vec!["train", "mapping"],
        ),
        (
            "negative epochs type",
            ok.replace("  max_steps: 2", "  epochs: -3"),
            vec!["train.epochs"],
        ),
    ];
    assert!(cases.len() >= 20);
    for (name, text, expect) in cases {
        run_train(name, &s, &text, &expect);
    }
    // recipe file itself
    check(
        "recipe file missing",
        &s,
        &["train", "absent.yaml"],
        &["absent.yaml"],
    );
    s.write("recipe.yaml", &ok);
    check(
        "malformed --set",
        &s,
        &["train", "recipe.yaml", "--set", "train.max_steps"],
        &["--set train.max_steps", "KEY.PATH=VALUE"],
    );
    check(
        "--set with a typo",
        &s,
        &["train", "recipe.yaml", "--set", "train.max_stepz=3"],
        &["train.max_stepz", "did you mean max_steps?"],
    );
}

#[test]
fn data_files() {
    let s = Scratch::new();
    let ok = s.recipe("");
    let cases: Vec<(&str, &[u8], &str, Vec<&str>)> = vec![
        (
            "malformed json line",
            b"{\"text\": \"a\"}\n{\"text\": \n",
            "completion",
            vec!["train.jsonl:2", "invalid JSON"],
        ),
        (
            "missing field",
            b"{\"txt\": \"a\"}\n",
            "completion",
            vec!["train.jsonl:1", "missing field \"text\""],
        ),
        (
            "empty text",
            b"{\"text\": \"\"}\n",
            "completion",
            vec!["train.jsonl:1", "\"text\" is empty"],
        ),
        (
            "not utf-8",
            b"{\"text\": \"a\"}\n{\"text\": \"\xc3\x28\"}\n",
            "completion",
            vec!["train.jsonl:2", "not valid UTF-8"],
        ),
        (
            "empty file",
            b"",
            "completion",
            vec!["train.jsonl", "no examples"],
        ),
        (
            "non-string instruction",
            b"{\"instruction\": 1, \"output\": \"x\"}\n",
            "instruction",
            vec!["train.jsonl:1", "\"instruction\" must be a string"],
        ),
        (
            "missing output",
            b"{\"instruction\": \"x\"}\n",
            "instruction",
            vec!["train.jsonl:1", "missing field \"output\""],
        ),
        (
            "unknown chat role",
            b"{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
            "chat",
            vec!["train.jsonl:1", "messages[0].role", "bot"],
        ),
        (
            "no assistant turn",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
            "chat",
            vec!["train.jsonl:1", "no assistant message"],
        ),
        (
            "messages not an array",
            b"{\"messages\": \"hi\"}\n",
            "chat",
            vec!["train.jsonl:1", "messages"],
        ),
        (
            "a JSON array line",
            b"[1, 2]\n",
            "completion",
            vec!["train.jsonl:1", "missing field \"text\""],
        ),
    ];
    for (name, bytes, format, expect) in cases {
        std::fs::write(s.path("train.jsonl"), bytes).unwrap();
        let text = ok.replace("format: completion", &format!("format: {format}"));
        run_train(name, &s, &text, &expect);
    }
    std::fs::copy(
        root().join("examples/data/capitals-train.jsonl"),
        s.path("train.jsonl"),
    )
    .unwrap();
    std::fs::write(s.path("eval.jsonl"), b"{\"text\": 5}\n").unwrap();
    run_train(
        "bad eval line",
        &s,
        &ok,
        &["eval.jsonl:1", "\"text\" must be a string"],
    );
    // chat data for a model without a chat template
    std::fs::copy(
        root().join("examples/data/capitals-chat-train.jsonl"),
        s.path("train.jsonl"),
    )
    .unwrap();
    std::fs::copy(
        root().join("examples/data/capitals-chat-eval.jsonl"),
        s.path("eval.jsonl"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.path("model/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(s.path("model/tokenizer_config.json"), cfg.to_string()).unwrap();
    run_train(
        "no chat template",
        &s,
        &ok.replace("format: completion", "format: chat"),
        &["tokenizer_config.json", "chat_template"],
    );
    // eval command on a bad file
    check(
        "eval data missing",
        &s,
        &["eval", "--model", "model", "--data", "missing.jsonl"],
        &["missing.jsonl"],
    );
}

/// Rewrites model/model.safetensors with `f` applied to its tensors.
fn edit_weights(
    s: &Scratch,
    f: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let p = s.path("model/model.safetensors");
    let mut map = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
    f(&mut map);
    candle_core::safetensors::save(&map, &p).unwrap();
}

#[test]
fn model_directories() {
    type Setup = Box<dyn Fn(&Scratch)>;
    let cases: Vec<(&str, Setup, Vec<&str>)> = vec![
        (
            "missing config.json",
            Box::new(|s| std::fs::remove_file(s.path("model/config.json")).unwrap()),
            vec!["model/config.json"],
        ),
        (
            "garbled config.json",
            Box::new(|s| s.write("model/config.json", "{\"model_type\": ")),
            vec!["model/config.json", "invalid JSON"],
        ),
        (
            "unknown model_type",
            Box::new(|s| {
                let t = std::fs::read_to_string(s.path("model/config.json"))
                    .unwrap()
                    .replace("\"llama\"", "\"falcon\"");
                s.write("model/config.json", &t);
            }),
            vec!["config.json", "model_type", "falcon"],
        ),
        (
            "indivisible kv heads",
            Box::new(|s| {
                let t = std::fs::read_to_string(s.path("model/config.json"))
                    .unwrap()
                    .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
                s.write("model/config.json", &t);
            }),
            vec!["config.json", "num_key_value_heads"],
        ),
        (
            "missing tensor",
            Box::new(|s| {
                edit_weights(s, |m| {
                    m.remove("model.layers.1.mlp.up_proj.weight");
                })
            }),
            vec![
                "model.safetensors",
                "model.layers.1.mlp.up_proj.weight",
                "missing",
            ],
        ),
        (
            "extra layer",
            Box::new(|s| {
                edit_weights(s, |m| {
                    let t = m["model.norm.weight"].clone();
                    m.insert("model.layers.2.input_layernorm.weight".into(), t);
                })
            }),
            vec![
                "model.safetensors",
                "model.layers.2.input_layernorm.weight",
                "num_hidden_layers = 2",
            ],
        ),
        (
            "wrong shape",
            Box::new(|s| {
                let t = std::fs::read_to_string(s.path("model/config.json"))
                    .unwrap()
                    .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
                s.write("model/config.json", &t);
            }),
            vec![
                "model.safetensors",
                "gate_proj.weight",
                "[96, 64]",
                "[128, 64]",
            ],
        ),
        (
            "truncated safetensors",
            Box::new(|s| {
                let b = std::fs::read(s.path("model/model.safetensors")).unwrap();
                std::fs::write(s.path("model/model.safetensors"), &b[..b.len() - 100]).unwrap();
            }),
            vec!["model.safetensors", "truncated"],
        ),
        (
            "oversized header",
            Box::new(|s| {
                let mut b = std::fs::read(s.path("model/model.safetensors")).unwrap();
                b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                std::fs::write(s.path("model/model.safetensors"), &b).unwrap();
            }),
            vec!["model.safetensors", "header"],
        ),
        (
            "integer weights",
            Box::new(|s| {
                edit_weights(s, |m| {
                    let t = m["model.norm.weight"]
                        .to_dtype(candle_core::DType::U8)
                        .unwrap();
                    m.insert("model.norm.weight".into(), t);
                })
            }),
            vec!["model.safetensors", "model.norm.weight", "U8"],
        ),
        (
            "index names a missing shard",
            Box::new(|s| {
                std::fs::remove_file(s.path("model/model.safetensors")).unwrap();
                s.write("model/model.safetensors.index.json", "{\"weight_map\": {\"model.norm.weight\": \"model-00001-of-00002.safetensors\"}}");
            }),
            vec!["model-00001-of-00002.safetensors"],
        ),
        (
            "index puts a tensor in the wrong shard",
            Box::new(|s| {
                std::fs::rename(
                    s.path("model/model.safetensors"),
                    s.path("model/model-00001-of-00001.safetensors"),
                )
                .unwrap();
                s.write("model/model.safetensors.index.json", "{\"weight_map\": {\"model.norm.weight\": \"model-00001-of-00001.safetensors\", \"no.such.tensor\": \"model-00001-of-00001.safetensors\"}}");
            }),
            vec!["model.safetensors.index.json", "no.such.tensor"],
        ),
        (
            "garbled index",
            Box::new(|s| s.write("model/model.safetensors.index.json", "[")),
            vec!["model.safetensors.index.json", "invalid JSON"],
        ),
        (
            "no weights at all",
            Box::new(|s| std::fs::remove_file(s.path("model/model.safetensors")).unwrap()),
            vec!["model", "no model.safetensors"],
        ),
        (
            "missing tokenizer.json",
            Box::new(|s| std::fs::remove_file(s.path("model/tokenizer.json")).unwrap()),
            vec!["model/tokenizer.json", "not found"],
        ),
    ];
    for (name, setup, expect) in cases {
        let s = Scratch::new();
        setup(&s);
        let args = train(&s);
        check(
            name,
            &s,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &expect,
        );
        if name != "missing tokenizer.json" {
            check(
                &format!("{name} (inspect)"),
                &s,
                &["inspect", "model"],
                &expect[..1],
            );
        }
    }
}

/// An adapter directory `name` made from the fixture `all_f32` adapter by `edit`.
fn adapter(
    s: &Scratch,
    name: &str,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> PathBuf {
    let src = root().join("tests/fixtures/peft/llama_gqa/adapters/all_f32");
    let dir = s.path(name);
    std::fs::create_dir(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    config(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut map = candle_core::safetensors::load(
        src.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    tensors(&mut map);
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
    dir
}

#[test]
fn adapters() {
    let s = Scratch::new();
    let base = root().join("tests/fixtures/peft/llama_gqa/base");
    let base = base.to_str().unwrap();
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    type Case = (&'static str, PathBuf, Vec<&'static str>);
    let cases: Vec<Case> = vec![
        (
            "made for another base",
            adapter(
                &s,
                "other",
                |_| {},
                |m| {
                    m.insert(
                        format!("{q}.lora_A.weight"),
                        candle_core::Tensor::zeros(
                            (4, 20),
                            candle_core::DType::F32,
                            &candle_core::Device::Cpu,
                        )
                        .unwrap(),
                    );
                },
            ),
            vec![
                "other/adapter_model.safetensors",
                "q_proj.lora_A.weight",
                "[4, 20]",
                "[4, 32]",
            ],
        ),
        (
            "missing lora_B",
            adapter(
                &s,
                "nob",
                |_| {},
                |m| {
                    m.remove(&format!("{q}.lora_B.weight"));
                },
            ),
            vec![
                "nob/adapter_model.safetensors",
                "q_proj.lora_B.weight",
                "missing",
            ],
        ),
        (
            "unknown peft_type",
            adapter(&s, "ia3", |c| c["peft_type"] = "IA3".into(), |_| {}),
            vec!["ia3/adapter_config.json", "peft_type", "IA3"],
        ),
        (
            "dora",
            // DoRA switched on in the config, but the file holds no magnitudes
            adapter(&s, "dora", |c| c["use_dora"] = true.into(), |_| {}),
            vec![
                "dora/adapter_model.safetensors",
                "lora_magnitude_vector",
                "dora adapter",
            ],
        ),
        (
            "lora_bias",
            adapter(&s, "lbias", |c| c["lora_bias"] = true.into(), |_| {}),
            vec!["lbias/adapter_config.json", "lora_bias"],
        ),
        (
            "corda init",
            adapter(
                &s,
                "corda",
                |c| c["init_lora_weights"] = "corda".into(),
                |_| {},
            ),
            vec!["corda/adapter_config.json", "init_lora_weights"],
        ),
        (
            "rank disagrees with config",
            adapter(&s, "rank", |c| c["r"] = 8.into(), |_| {}),
            vec!["rank/adapter_model.safetensors", "rank"],
        ),
        (
            "key without prefix",
            adapter(
                &s,
                "noprefix",
                |_| {},
                |m| {
                    let t = m.remove(&format!("{q}.lora_A.weight")).unwrap();
                    m.insert("model.layers.0.self_attn.q_proj.lora_A.weight".into(), t);
                },
            ),
            vec!["noprefix/adapter_model.safetensors", "base_model.model."],
        ),
        (
            "nan values",
            adapter(
                &s,
                "nan",
                |_| {},
                |m| {
                    let t = (m[&format!("{q}.lora_B.weight")].clone() / 0.0).unwrap();
                    m.insert(format!("{q}.lora_B.weight"), t);
                },
            ),
            vec!["nan/adapter_model.safetensors", "NaN"],
        ),
        (
            "embedding lora tensors",
            adapter(
                &s,
                "embed",
                |_| {},
                |m| {
                    let t = m[&format!("{q}.lora_A.weight")].clone();
                    m.insert(
                        "base_model.model.model.embed_tokens.lora_embedding_A".into(),
                        t,
                    );
                },
            ),
            vec!["embed/adapter_model.safetensors", "embedding"],
        ),
        (
            "garbled config",
            {
                let d = adapter(&s, "garbled", |_| {}, |_| {});
                std::fs::write(d.join("adapter_config.json"), "{\"r\": ").unwrap();
                d
            },
            vec!["garbled/adapter_config.json", "invalid JSON"],
        ),
        (
            "missing target_modules",
            adapter(
                &s,
                "notargets",
                |c| {
                    c.as_object_mut().unwrap().remove("target_modules");
                },
                |_| {},
            ),
            vec!["notargets/adapter_config.json", "target_modules"],
        ),
        (
            "pickle only",
            {
                let d = adapter(&s, "pickle", |_| {}, |_| {});
                std::fs::rename(
                    d.join("adapter_model.safetensors"),
                    d.join("adapter_model.bin"),
                )
                .unwrap();
                d
            },
            vec!["pickle/adapter_model.safetensors", "adapter_model.bin"],
        ),
        (
            "no adapter dir",
            s.path("nowhere"),
            vec!["nowhere/adapter_config.json", "not found"],
        ),
    ];
    for (name, dir, expect) in cases {
        check(
            name,
            &s,
            &[
                "merge",
                "--base",
                base,
                "--adapter",
                dir.to_str().unwrap(),
                "--out",
                s.path("merged").to_str().unwrap(),
            ],
            &expect,
        );
    }
}

#[test]
fn outputs() {
    let s = Scratch::new();
    let base = root().join("tests/fixtures/peft/llama_gqa/base");
    let ad = root().join("tests/fixtures/peft/llama_gqa/adapters/all_f32");
    let (base, ad) = (base.to_str().unwrap(), ad.to_str().unwrap());
    std::fs::create_dir(s.path("taken")).unwrap();
    std::fs::write(s.path("taken/keep.txt"), "mine").unwrap();
    check(
        "merge into a non-empty dir",
        &s,
        &[
            "merge",
            "--base",
            base,
            "--adapter",
            ad,
            "--out",
            s.path("taken").to_str().unwrap(),
        ],
        &["taken", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(s.path("taken/keep.txt")).unwrap(),
        "mine"
    );
    s.write("a-file", "x");
    check(
        "merge under a file",
        &s,
        &[
            "merge",
            "--base",
            base,
            "--adapter",
            ad,
            "--out",
            s.path("a-file/merged").to_str().unwrap(),
        ],
        &["a-file"],
    );
    run_train(
        "train output under a file",
        &s,
        &s.recipe("").replace("/out\n", "/a-file/out\n"),
        &["a-file"],
    );
    run_train(
        "train --force on a foreign dir",
        &s,
        &s.recipe("").replace("/out\n", "/taken\n"),
        &["taken", "--resume"],
    );
    // a full disk: stdout on /dev/full
    if Path::new("/dev/full").exists() {
        let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .args(["inspect", base])
            .stdout(Stdio::from(std::fs::File::create("/dev/full").unwrap()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("writing to standard output") && !err.contains("panicked"),
            "{err}"
        );
    }
}

/// A minimal GGUF of architecture `arch`: one block of embedding size 8, and F32 tensors given as
/// (name, [in, out]).
fn gguf(arch: &str, tensors: &[(&str, [u64; 2])]) -> Vec<u8> {
    common::gguf(
        &[
            ("general.architecture", 8, common::gguf_str(arch)),
            ("llama.block_count", 4, 1u32.to_le_bytes().to_vec()),
            ("llama.embedding_length", 4, 8u32.to_le_bytes().to_vec()),
            ("llama.feed_forward_length", 4, 12u32.to_le_bytes().to_vec()),
            ("llama.attention.head_count", 4, 2u32.to_le_bytes().to_vec()),
        ],
        tensors,
    )
}

#[test]
fn gguf_files() {
    let s = Scratch::new();
    let tensors = [
        ("token_embd.weight", [8, 16]),
        ("blk.0.attn_q.weight", [8, 8]),
        ("blk.0.ffn_down.weight", [12, 8]),
        ("output_norm.weight", [8, 1]),
    ];
    let good = gguf("llama", &tensors);
    std::fs::write(s.path("good.gguf"), &good).unwrap();
    // the good file inspects, with Hugging Face module names and [out, in] shapes
    let o = s.lorakit(&["inspect", "good.gguf"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("model.layers.0.self_attn.q_proj  [8, 8]")
            && out.contains("model.layers.0.mlp.down_proj     [8, 12]"),
        "{out}"
    );
    assert!(
        out.contains("lm_head") && out.contains("tied embeddings"),
        "{out}"
    );

    std::fs::write(s.path("truncated.gguf"), &good[..good.len() - 40]).unwrap();
    check(
        "truncated gguf",
        &s,
        &["inspect", "truncated.gguf"],
        &["truncated.gguf", "outside the file"],
    );
    std::fs::write(s.path("header-cut.gguf"), &good[..60]).unwrap();
    check(
        "gguf cut in its header",
        &s,
        &["inspect", "header-cut.gguf"],
        &["header-cut.gguf", "truncated"],
    );
    std::fs::write(s.path("gpt2.gguf"), gguf("gpt2", &tensors)).unwrap();
    check(
        "unsupported gguf architecture",
        &s,
        &["inspect", "gpt2.gguf"],
        &["gpt2.gguf", "general.architecture", "gpt2", "not supported"],
    );
    std::fs::write(s.path("noise.gguf"), b"PK\x03\x04 this is a zip file").unwrap();
    check(
        "not a gguf",
        &s,
        &["inspect", "noise.gguf"],
        &["noise.gguf", "not a GGUF file"],
    );
    let mut hostile = good.clone();
    hostile[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    std::fs::write(s.path("hostile.gguf"), &hostile).unwrap();
    check(
        "gguf with a hostile tensor count",
        &s,
        &["inspect", "hostile.gguf"],
        &["hostile.gguf", "truncated or corrupt"],
    );
}

/// Labelled data: classification by a generative model (`eval --labels`) and BERT classifiers.
#[test]
fn labelled_data() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("bert")).unwrap();
    let bert = root().join("tests/fixtures/peft/bert_seq_cls/base");
    for e in std::fs::read_dir(&bert).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), s.path("bert").join(e.file_name())).unwrap();
    }
    let chat = |answer: &str| {
        format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Is it good?\"}}, {{\"role\": \"assistant\", \"content\": \"{answer}\"}}]}}\n")
    };
    s.write(
        "labelled.jsonl",
        &(chat("yes") + &chat("no") + &chat("maybe")),
    );
    let eval = |labels: &str| {
        vec![
            "eval".to_string(),
            "--model".into(),
            "model".into(),
            "--data".into(),
            "labelled.jsonl".into(),
            "--format".into(),
            "chat".into(),
            "--labels".into(),
            labels.into(),
        ]
    };
    let args = eval("yes,no");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    check(
        "answer outside the label set",
        &s,
        &args,
        &[
            "labelled.jsonl:3",
            "\"maybe\"",
            "not one of the labels (yes, no)",
        ],
    );
    let args = eval("yes");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    check("a single label", &s, &args, &["at least two labels"]);

    let cls = |labels: &str| {
        format!(
            "model:\n  path: {d}/bert\n  task: sequence_classification\ndata:\n  train: {d}/cls.jsonl\n  format: classification\n{labels}train:\n  max_steps: 2\n  batch_size: 2\noutput:\n  dir: {d}/out\n",
            d = s.dir.display()
        )
    };
    s.write(
        "cls.jsonl",
        "{\"text\": \"good movie\", \"label\": \"positive\"}\n{\"text\": \"bad movie\", \"label\": \"negative\"}\n{\"text\": \"dull\", \"label\": \"neutral\"}\n",
    );
    run_train(
        "training label outside data.labels",
        &s,
        &cls("  labels: [negative, positive]\n"),
        &[
            "cls.jsonl:3",
            "\"neutral\"",
            "not in the label set (negative, positive)",
        ],
    );
    run_train(
        "num_labels disagrees with the data",
        &s,
        &cls("").replace(
            "task: sequence_classification",
            "task: sequence_classification\n  num_labels: 2",
        ),
        &["model.num_labels", "3 labels"],
    );
    run_train(
        "classification task with chat data",
        &s,
        &cls("").replace("format: classification", "format: chat"),
        &["data.format", "classification"],
    );
    run_train(
        "classification data for a causal LM",
        &s,
        &cls("").replace("  task: sequence_classification\n", ""),
        &["data.format", "model.task: sequence_classification"],
    );
    check(
        "BERT eval without label names",
        &s,
        &[
            "eval",
            "--model",
            "bert",
            "--data",
            "cls.jsonl",
            "--format",
            "classification",
        ],
        &["bert", "--labels"],
    );
    check(
        "convert a model directory",
        &s,
        &["convert", "model", "--out", "converted"],
        &["model", "not a .gguf file"],
    );
    check(
        "generate with top-p out of range",
        &s,
        &[
            "generate", "--model", "model", "--prompt", "x", "--top-p", "1.5",
        ],
        &["--top-p"],
    );
}
