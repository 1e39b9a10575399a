//! End-to-end tests through the `lorakit` binary: `inspect` and `merge` on the PEFT fixtures.
mod common;
use common::{lorakit, text};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

/// A failure must be an ordinary error: exit 1, a message, no panic or backtrace.
fn assert_clean_failure(o: &Output) -> String {
    let (_, err) = text(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    err
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn inspect_lists_every_linear_module_with_shapes() {
    let base = fixtures().join("llama_gqa/base");
    let o = lorakit(&["inspect", p(&base)]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("architecture: llama (2 layers, hidden 32, 4 heads / 2 kv heads"),
        "{out}"
    );
    assert!(out.contains("linear modules (15)"), "{out}");
    assert!(
        out.contains("model.layers.0.self_attn.q_proj  [32, 32]"),
        "{out}"
    );
    assert!(
        out.contains("model.layers.1.self_attn.k_proj  [16, 32]"),
        "{out}"
    );
    assert!(
        out.contains("model.layers.1.mlp.down_proj     [32, 48]"),
        "{out}"
    );
    assert!(
        out.contains("lm_head                          [96, 32]"),
        "{out}"
    );
    // parameter count = sum of tensor sizes in the file
    let n = 96 * 32 * 2 + 32 + 2 * (32 * 32 * 2 + 16 * 32 * 2 + 48 * 32 * 3 + 32 * 2);
    assert!(
        out.contains(&format!("parameters:   {}", group(n))),
        "{out}"
    );
}

fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn inspect_shows_what_targets_would_wrap() {
    let base = fixtures().join("qwen2_tied/base");
    let o = lorakit(&[
        "inspect",
        p(&base),
        "--target-modules",
        "q_proj,v_proj",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["architecture"], "qwen2");
    assert_eq!(v["tie_word_embeddings"], true);
    let wrapped: Vec<&str> = v["linear_modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["wrapped"] == true)
        .map(|m| m["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        wrapped,
        vec![
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    // q: [32, 32], v: [16, 32] at r = 8, two layers
    assert_eq!(v["lora_parameters"], 2 * 8 * ((32 + 32) + (32 + 16)));

    let o = lorakit(&["inspect", p(&base), "--target-modules", "all-linear"]);
    let (out, _) = text(&o);
    assert!(out.contains("LoRA would wrap 14 of 15"), "{out}");
    assert!(
        out.contains("    lm_head"),
        "lm_head must not be wrapped by all-linear: {out}"
    );

    let o = lorakit(&[
        "inspect",
        p(&base),
        "--target-regex",
        r"model\.layers\.1\..*_proj",
        "--exclude-modules",
        "down_proj",
    ]);
    let (out, _) = text(&o);
    assert!(out.contains("LoRA would wrap 6 of 15"), "{out}");
}

#[test]
fn inspect_names_target_entries_that_match_nothing() {
    let base = fixtures().join("llama3_sharded/base");
    let o = lorakit(&["inspect", p(&base), "--target-modules", "q_proj,qkv_proj"]);
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("`qkv_proj`") && !err.contains("`q_proj`"),
        "{err}"
    );
    // the listing still comes first, from the sharded checkpoint
    assert!(text(&o).0.contains("3 files"), "{}", text(&o).0);
}

#[test]
fn inspect_errors_name_the_file() {
    let o = lorakit(&["inspect", "/nonexistent/model"]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("/nonexistent/model"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "gpt_neox", "vocab_size": 3}"#,
    )
    .unwrap();
    let err = assert_clean_failure(&lorakit(&["inspect", p(tmp.path())]));
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("gpt_neox"),
        "{err}"
    );

    // a config whose shapes disagree with the weights
    let base = fixtures().join("llama_gqa/base");
    for f in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(base.join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = 64.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = assert_clean_failure(&lorakit(&["inspect", p(tmp.path())]));
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[64, 32]")
            && err.contains("[48, 32]"),
        "{err}"
    );
}

#[test]
fn merge_with_verify_writes_a_loadable_model() {
    let case = fixtures().join("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = lorakit(&[
        "merge",
        "--base",
        p(&case.join("base")),
        "--adapter",
        p(&case.join("adapters/rslora_patterns")),
        "--out",
        p(&out),
        "--verify",
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("merged 6 LoRA modules"), "{stdout}");
    let diff: f64 = stdout
        .split("= ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no verify figure in {stdout}"));
    assert!(diff < 1e-5, "{stdout}");
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // the merged directory is itself a model lorakit can inspect
    assert!(lorakit(&["inspect", p(&out)]).status.success());
}

#[test]
fn merge_refuses_to_overwrite_without_force() {
    let case = fixtures().join("mistral_window");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"keep me").unwrap();
    let args = |force: bool| {
        let mut v = vec![
            "merge".to_string(),
            "--base".into(),
            p(&case.join("base")).into(),
            "--adapter".into(),
            p(&case.join("adapters/qv")).into(),
            "--out".into(),
            p(&out).into(),
            "--dtype".into(),
            "bf16".into(),
        ];
        if force {
            v.push("--force".into());
        }
        v
    };
    let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args(false))
        .output()
        .unwrap();
    let err = assert_clean_failure(&o);
    assert!(err.contains("--force") && err.contains("merged"), "{err}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"keep me");

    // --force replaces only a directory lorakit made: not this one, which is the user's
    let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args(true))
        .output()
        .unwrap();
    let err = assert_clean_failure(&o);
    assert!(err.contains(".lorakit-output.json"), "{err}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"keep me");
    std::fs::remove_dir_all(&out).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args(false))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    std::fs::write(out.join("notes.txt"), b"added later").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args(true))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(!out.join("notes.txt").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    // only the finished directory remains beside it
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn merge_refuses_unsupported_or_mismatched_adapters_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("llama_gqa");
    let src = case.join("adapters/all_f32");

    // DoRA switched on in the config, but the file holds no magnitudes
    let dora = tmp.path().join("dora");
    std::fs::create_dir(&dora).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["use_dora"] = true.into();
    std::fs::write(dora.join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = tmp.path().join("out");
    let o = lorakit(&[
        "merge",
        "--base",
        p(&case.join("base")),
        "--adapter",
        p(&dora),
        "--out",
        p(&out),
    ]);
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("lora_magnitude_vector") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    assert!(!out.exists());

    // a truncated weights file
    let trunc = tmp.path().join("trunc");
    std::fs::create_dir(&trunc).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        trunc.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        trunc.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let o = lorakit(&[
        "merge",
        "--base",
        p(&case.join("base")),
        "--adapter",
        p(&trunc),
        "--out",
        p(&out),
    ]);
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    assert!(!out.exists());

    // no adapter directory at all
    let o = lorakit(&[
        "merge",
        "--base",
        p(&case.join("base")),
        "--adapter",
        p(&tmp.path().join("nope")),
        "--out",
        p(&out),
    ]);
    let err = assert_clean_failure(&o);
    assert!(err.contains("nope/adapter_config.json"), "{err}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "nothing new may be left behind"
    );
}

#[test]
fn merge_names_the_tensor_of_an_adapter_made_for_another_base() {
    // an adapter for a model with hidden size 20 applied to one with hidden size 32
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("llama_gqa");
    let ad = tmp.path().join("other");
    std::fs::create_dir(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let dev = candle_core::Device::Cpu;
    let mut map = std::collections::HashMap::new();
    map.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
        candle_core::Tensor::zeros((4, 20), candle_core::DType::F32, &dev).unwrap(),
    );
    map.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
        candle_core::Tensor::zeros((20, 4), candle_core::DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&map, ad.join("adapter_model.safetensors")).unwrap();
    let out = tmp.path().join("out");
    let o = lorakit(&[
        "merge",
        "--base",
        p(&case.join("base")),
        "--adapter",
        p(&ad),
        "--out",
        p(&out),
    ]);
    let err = assert_clean_failure(&o);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.lora_A.weight")
            && err.contains("[4, 20]")
            && err.contains("[4, 32]"),
        "{err}"
    );
    assert!(!out.exists());
}
