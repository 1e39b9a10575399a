//! End to end on a quantized GGUF base (QLoRA): training, eval and generation with the weights
//! kept in their GGML blocks (`model.quantized: keep`, the default) give what the same commands
//! give with the weights dequantized at load; `--resume` continues a kept run exactly; the base
//! file is never written. The bases are the tiny example Llama merged into GGUF files by
//! `lorakit merge --quantize` (q/k rows in llama.cpp's order, the tied embeddings quantized).
mod common;
use common::{lorakit, root, text};
use lorakit_ops::compare::max_rel_diff;
use std::path::{Path, PathBuf};

const MODEL: &str = "examples/tiny-llama";
const ADAPTER: &str = "tests/fixtures/trained/lorakit_adapter";
const EVAL: &str = "examples/data/capitals-eval.jsonl";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = lorakit(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?}: {out}\n{err}");
    out
}

/// The tiny Llama (with an adapter folded in) as a GGUF whose linear and embedding weights are
/// `ty` blocks.
fn quantized_base(dir: &Path, ty: &str) -> PathBuf {
    let file = dir.join(format!("base-{ty}.gguf"));
    ok(&[
        "merge",
        "--base",
        MODEL,
        "--adapter",
        ADAPTER,
        "--out",
        p(&file),
        "--quantize",
        ty,
    ]);
    file
}

fn train(base: &Path, mode: &str, out: &Path, extra: &[&str]) -> String {
    let model = format!("model.path={}", p(base));
    let quantized = format!("model.quantized={mode}");
    let dir = format!("output.dir={}", p(out));
    let mut args = vec![
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        &model,
        "--set",
        &quantized,
        "--set",
        &dir,
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_every=3",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.log_every=1",
    ];
    args.extend(extra);
    ok(&args)
}

/// Every training and eval loss of a run, by step.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .flat_map(|v| {
            let step = v["step"].as_u64().unwrap();
            ["loss", "eval_loss"]
                .into_iter()
                .filter_map(move |k| Some((step, v.get(k)?.as_f64()?)))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn adapter(out: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        out.join("last/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

#[test]
fn training_on_a_kept_quantized_base_equals_the_dequantized_run_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for ty in ["q8_0", "q4_0"] {
        let base = quantized_base(tmp.path(), ty);
        let before = std::fs::read(&base).unwrap();
        let keep = tmp.path().join(format!("keep-{ty}"));
        let deq = tmp.path().join(format!("deq-{ty}"));
        let said = train(&base, "keep", &keep, &[]);
        assert!(said.contains("kept in GGML blocks"), "{said}");
        let said = train(&base, "dequantize", &deq, &[]);
        assert!(!said.contains("kept in GGML blocks"), "{said}");
        // the same losses step by step (train and eval) ...
        let (lk, ld) = (losses(&keep), losses(&deq));
        assert_eq!(lk.len(), ld.len());
        assert!(lk.len() >= 8, "{lk:?}");
        for ((sk, a), (sd, b)) in lk.iter().zip(&ld) {
            assert_eq!(sk, sd);
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{ty} step {sk}: {a} vs {b}"
            );
        }
        // ... and the same adapter, to 1e-3 of each tensor's largest value: the gradients
        // differ by f32 rounding (1e-6), and Adam's step `m/√v` turns a rounding difference
        // in a near-zero gradient into a visible one over six steps at lr 3e-3
        let (ak, ad) = (adapter(&keep), adapter(&deq));
        assert_eq!(ak.len(), ad.len());
        for (name, t) in &ak {
            let r = max_rel_diff(t, &ad[name]).unwrap();
            assert!(r < 1e-3, "{ty} {name}: {r}");
        }
        // an adapter trained on the quantized base is an ordinary PEFT adapter
        let config = std::fs::read_to_string(keep.join("adapter/adapter_config.json")).unwrap();
        assert!(config.contains("\"peft_type\": \"LORA\""), "{config}");

        // resume from the step-3 checkpoint: byte-identical final adapter
        let part = tmp.path().join(format!("part-{ty}"));
        train(&base, "keep", &part, &[]);
        std::fs::remove_dir_all(part.join("checkpoints/step-6")).unwrap();
        let kept_final = std::fs::read(keep.join("last/adapter_model.safetensors")).unwrap();
        train(&base, "keep", &part, &["--resume"]);
        assert!(
            std::fs::read(part.join("last/adapter_model.safetensors")).unwrap() == kept_final,
            "{ty}: resumed run differs"
        );
        assert!(
            std::fs::read(&base).unwrap() == before,
            "{ty}: base file changed"
        );
    }
}

#[test]
fn eval_and_generation_on_a_kept_base_equal_the_dequantized_model() {
    let tmp = tempfile::tempdir().unwrap();
    let base = quantized_base(tmp.path(), "q4_0");
    let eval = |mode: &str| -> serde_json::Value {
        let out = ok(&[
            "eval",
            "--model",
            p(&base),
            "--data",
            EVAL,
            "--json",
            "--quantized",
            mode,
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let (k, d) = (eval("keep"), eval("dequantize"));
    assert_eq!(k["tokens"], d["tokens"]);
    let (k, d) = (k["loss"].as_f64().unwrap(), d["loss"].as_f64().unwrap());
    assert!((k - d).abs() <= 1e-5 * d, "keep {k} vs dequantize {d}");
    let generate = |mode: &str| {
        ok(&[
            "generate",
            "--model",
            p(&base),
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "12",
            "--quantized",
            mode,
        ])
    };
    assert_eq!(generate("keep"), generate("dequantize"));
    // a typo in the type is named
    let o = lorakit(&[
        "eval",
        "--model",
        MODEL,
        "--data",
        EVAL,
        "--quantize",
        "q3_x",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("q8_0, q4_0, q4_k, q5_k, q6_k"),
        "{}",
        text(&o).1
    );
    let _ = root();
}

#[test]
fn model_quantize_holds_a_safetensors_bases_linear_weights_in_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |ty: &str, out: &str| {
        let quantize = format!("model.quantize={ty}");
        let dir = format!("output.dir={}", p(&tmp.path().join(out)));
        lorakit(&[
            "train",
            "recipes/tiny-completion.yaml",
            "--set",
            &quantize,
            "--set",
            &dir,
            "--set",
            "train.max_steps=3",
        ])
    };
    // every projection of the tiny Llama (64 and 128 inputs: whole 32-value blocks); its head is
    // tied to the embeddings, which stay as they are
    let o = run("q8_0", "q8");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("kept in GGML blocks") && out.contains("Q8_0 14)"),
        "{out}"
    );
    // Q4_K blocks are 256 values: nothing fits, and the run says so
    let o = run("q4_k", "q4k");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("14 linear weight(s) stay dense"), "{out}");
    // an unknown type is named with the choices, before anything is written
    let o = run("q3", "bad");
    let err = text(&o).1;
    assert!(!o.status.success());
    assert!(
        err.contains("model.quantize") && err.contains("q4_k"),
        "{err}"
    );
    assert!(!tmp.path().join("bad").exists());
}
