//! End-to-end: `lorakit export` (GGUF adapters out and back in), `lorakit combine`, several
//! `--adapter`s at once, adapter cards, and the refusals that keep a user's files safe.
mod common;
use common::{lorakit, root, text};
use std::path::Path;

const MODEL: &str = "examples/tiny-llama";
const DATA: &str = "examples/data/capitals-eval.jsonl";
const A: &str = "tests/fixtures/trained/lorakit_adapter";
const B: &str = "tests/fixtures/trained/peft_adapter";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = lorakit(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?}: {err}");
    out
}

fn fails(args: &[&str]) -> String {
    let o = lorakit(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    text(&o).1
}

/// `lorakit eval` loss with these `--adapter` arguments.
fn loss(adapters: &[&str]) -> f64 {
    let mut args = vec!["eval", "--model", MODEL, "--data", DATA, "--json"];
    for a in adapters {
        args.extend(["--adapter", a]);
    }
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn a_gguf_adapter_evaluates_as_the_peft_adapter_and_converts_back() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("a.gguf");
    let out = ok(&["export", "--base", MODEL, "--adapter", A, "--out", p(&file)]);
    assert!(out.contains("general.architecture llama"), "{out}");
    let want = loss(&[A]);
    let got = loss(&[p(&file)]);
    assert!((got - want).abs() < 1e-5, "gguf {got} vs peft {want}");
    assert!(
        (want - loss(&[])).abs() > 0.05,
        "the adapter must change the loss"
    );

    // --to peft: a PEFT directory with a model card, the same loss
    let dir = t.path().join("back");
    ok(&[
        "export",
        "--base",
        MODEL,
        "--adapter",
        p(&file),
        "--to",
        "peft",
        "--out",
        p(&dir),
    ]);
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model: examples/tiny-llama\nlibrary_name: peft\n"),
        "{card}"
    );
    assert!(
        card.contains("a.gguf") && card.contains("llama-cli"),
        "{card}"
    );
    assert!((loss(&[p(&dir)]) - want).abs() < 1e-5);
    // generate takes it too
    let g1 = ok(&[
        "generate",
        "--model",
        MODEL,
        "--adapter",
        p(&file),
        "--prompt",
        "Paris",
        "--max-new-tokens",
        "6",
    ]);
    let g2 = ok(&[
        "generate",
        "--model",
        MODEL,
        "--adapter",
        A,
        "--prompt",
        "Paris",
        "--max-new-tokens",
        "6",
    ]);
    assert_eq!(g1, g2);
}

#[test]
fn several_adapters_add_their_updates_in_eval_merge_and_combine() {
    let t = tempfile::tempdir().unwrap();
    let both = loss(&[A, &format!("{B}:0.5")]);
    assert!((both - loss(&[A])).abs() > 1e-3 && (both - loss(&[B])).abs() > 1e-3);
    // combine --method cat is the same weighted sum, written as one adapter with its card
    let combined = t.path().join("c");
    let out = ok(&[
        "combine",
        "--adapter",
        A,
        "--adapter",
        &format!("{B}:0.5"),
        "--method",
        "cat",
        "--out",
        p(&combined),
    ]);
    assert!(out.contains("cat of 2 adapters"), "{out}");
    assert!((loss(&[p(&combined)]) - both).abs() < 1e-5);
    let card = std::fs::read_to_string(combined.join("README.md")).unwrap();
    assert!(
        card.contains("| `tests/fixtures/trained/peft_adapter` | 0.5 |"),
        "{card}"
    );
    // merge the pair: the merged model evaluates as base + both
    let merged = t.path().join("m");
    ok(&[
        "merge",
        "--base",
        MODEL,
        "--adapter",
        A,
        "--adapter",
        &format!("{B}:0.5"),
        "--out",
        p(&merged),
    ]);
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        p(&merged),
        "--data",
        DATA,
        "--json",
    ]))
    .unwrap();
    assert!((v["loss"].as_f64().unwrap() - both).abs() < 1e-4);
    // svd at the full combined rank is exact too
    let svd = t.path().join("s");
    let r: u64 = ["lorakit_adapter", "peft_adapter"]
        .iter()
        .map(|n| {
            let c: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(
                    root().join(format!("tests/fixtures/trained/{n}/adapter_config.json")),
                )
                .unwrap(),
            )
            .unwrap();
            c["r"].as_u64().unwrap()
        })
        .sum();
    ok(&[
        "combine",
        "--adapter",
        A,
        "--adapter",
        &format!("{B}:0.5"),
        "--method",
        "svd",
        "--rank",
        &r.to_string(),
        "--out",
        p(&svd),
    ]);
    assert!((loss(&[p(&svd)]) - both).abs() < 1e-4);
}

#[test]
fn a_merged_gguf_from_a_hugging_face_directory_evaluates_as_the_merged_directory() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("m.gguf");
    let out = ok(&[
        "merge",
        "--base",
        MODEL,
        "--adapter",
        A,
        "--out",
        p(&file),
        "--quantize",
        "f32",
    ]);
    assert!(out.contains("GGUF"), "{out}");
    let dir = t.path().join("m");
    ok(&["merge", "--base", MODEL, "--adapter", A, "--out", p(&dir)]);
    let eval = |model: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&["eval", "--model", model, "--data", DATA, "--json"])).unwrap()
    };
    // the GGUF's own tokenizer (rebuilt from its tokenizer.ggml.* keys) counts the same tokens
    let (g, d) = (eval(p(&file)), eval(p(&dir)));
    assert_eq!(g["tokens"], d["tokens"]);
    let (g, d) = (g["loss"].as_f64().unwrap(), d["loss"].as_f64().unwrap());
    assert!((g - d).abs() < 1e-4, "gguf {g} vs directory {d}");
    // f16 (the default) is close
    let f16 = t.path().join("m16.gguf");
    ok(&["merge", "--base", MODEL, "--adapter", A, "--out", p(&f16)]);
    assert!(std::fs::metadata(&f16).unwrap().len() < std::fs::metadata(&file).unwrap().len());
    let h = eval(p(&f16))["loss"].as_f64().unwrap();
    assert!((h - d).abs() < 2e-2, "f16 {h} vs {d}");
}

#[test]
fn outputs_that_must_not_be_replaced_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("a.gguf");
    ok(&["export", "--base", MODEL, "--adapter", A, "--out", p(&file)]);
    let err = fails(&["export", "--base", MODEL, "--adapter", A, "--out", p(&file)]);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    ok(&[
        "export",
        "--base",
        MODEL,
        "--adapter",
        A,
        "--out",
        p(&file),
        "--force",
        "--dtype",
        "f16",
    ]);
    // a file lorakit did not write, even with --force
    let notes = t.path().join("notes.gguf");
    std::fs::write(&notes, "my notes").unwrap();
    let err = fails(&[
        "export",
        "--base",
        MODEL,
        "--adapter",
        A,
        "--out",
        p(&notes),
        "--force",
    ]);
    assert!(err.contains("not a GGUF file"), "{err}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes");
    // an input, even with --force
    let err = fails(&[
        "export",
        "--base",
        MODEL,
        "--adapter",
        p(&file),
        "--out",
        p(&file),
        "--force",
    ]);
    assert!(err.contains("one of the inputs"), "{err}");
    assert!(file.is_file());
    // not a .gguf name; a merged GGUF from a Hugging Face base
    let err = fails(&[
        "export",
        "--base",
        MODEL,
        "--adapter",
        A,
        "--out",
        p(&t.path().join("x")),
    ]);
    assert!(err.contains(".gguf") && err.contains("--to peft"), "{err}");
    let err = fails(&[
        "merge",
        "--base",
        MODEL,
        "--adapter",
        A,
        "--out",
        p(&t.path().join("m.gguf")),
        "--dtype",
        "f32",
    ]);
    assert!(err.contains("--quantize"), "{err}");
    assert!(!t.path().join("m.gguf").exists());
    // a GGUF adapter without a base to name its modules
    let err = fails(&[
        "combine",
        "--adapter",
        p(&file),
        "--adapter",
        A,
        "--out",
        p(&t.path().join("c")),
    ]);
    assert!(err.contains("--base"), "{err}");
    // an architecture llama.cpp adapters do not cover here
    let err = fails(&[
        "export",
        "--base",
        "tests/fixtures/peft/bert_seq_cls/base",
        "--adapter",
        "tests/fixtures/peft/bert_seq_cls/adapter",
        "--out",
        p(&t.path().join("b.gguf")),
    ]);
    assert!(err.contains("llama.cpp") && err.contains("bert"), "{err}");
    // linear needs equal ranks
    let err = fails(&[
        "combine",
        "--adapter",
        A,
        "--adapter",
        B,
        "--method",
        "linear",
        "--out",
        p(&t.path().join("l")),
    ]);
    assert!(err.contains("same rank"), "{err}");
    // nothing half-written next to the outputs
    let stray: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}
