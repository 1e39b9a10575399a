//! The tokenizer lorakit builds from GGUF metadata encodes exactly like the reference: the tiny
//! model's own tokenizer.json (written into a GGUF the way llama.cpp's converter does), and
//! transformers' reading of the real SmolLM2 GGUF (fixture made by make_real_fixtures.py).
use lorakit_train::TextTokenizer;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes GGUF v3 metadata (no tensors): strings, u32s, string arrays, i32 arrays.
fn write_gguf(path: &Path, meta: &[(&str, serde_json::Value)]) {
    let mut b: Vec<u8> = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            serde_json::Value::String(t) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, t);
            }
            serde_json::Value::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(*x as u8);
            }
            serde_json::Value::Number(n) => {
                b.extend(4u32.to_le_bytes());
                b.extend((n.as_u64().unwrap() as u32).to_le_bytes());
            }
            serde_json::Value::Array(a) => {
                b.extend(9u32.to_le_bytes());
                if a.first().is_some_and(|x| x.is_f64()) {
                    b.extend(6u32.to_le_bytes()); // f32
                    b.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        b.extend((x.as_f64().unwrap() as f32).to_le_bytes());
                    }
                } else if a.first().is_some_and(|x| x.is_string()) {
                    b.extend(8u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        s(&mut b, x.as_str().unwrap());
                    }
                } else {
                    b.extend(5u32.to_le_bytes()); // i32
                    b.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        b.extend((x.as_i64().unwrap() as i32).to_le_bytes());
                    }
                }
            }
            _ => unreachable!(),
        }
    }
    std::fs::write(path, b).unwrap();
}

/// The tiny model's tokenizer as llama.cpp's converter stores it.
fn tiny_meta(pre: &str) -> Vec<(&'static str, serde_json::Value)> {
    let dir = root().join("examples/tiny-llama");
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (k, v) in vocab {
        tokens[v.as_u64().unwrap() as usize] = k.clone();
    }
    let special: Vec<u64> = t["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_u64().unwrap())
        .collect();
    let types: Vec<serde_json::Value> = (0..tokens.len() as u64)
        .map(|i| serde_json::json!(if special.contains(&i) { 3 } else { 1 }))
        .collect();
    let merges: Vec<serde_json::Value> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            serde_json::json!(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    vec![
        ("general.architecture", "llama".into()),
        ("tokenizer.ggml.model", "gpt2".into()),
        ("tokenizer.ggml.pre", pre.into()),
        ("tokenizer.ggml.tokens", tokens.into()),
        ("tokenizer.ggml.token_type", types.into()),
        ("tokenizer.ggml.merges", merges.into()),
        ("tokenizer.ggml.eos_token_id", 2.into()),
        ("tokenizer.ggml.add_bos_token", false.into()),
        ("tokenizer.chat_template", cfg["chat_template"].clone()),
    ]
}

const SAMPLES: &[&str] = &[
    "The capital of France is Paris.",
    "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\nLima<|im_end|>\n",
    "  spaces,\ttabs\n\nand 2024 digits; it's fine — naïve",
    "",
];

#[test]
fn gguf_tokenizer_encodes_like_the_models_tokenizer_json() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("tiny.gguf");
    write_gguf(&path, &tiny_meta("gpt2"));
    let ours = TextTokenizer::open(&path).unwrap();
    let reference = TextTokenizer::from_model_dir(&root().join("examples/tiny-llama")).unwrap();
    for text in SAMPLES {
        let a = ours.encode_with_offsets(text).unwrap();
        let b = reference.encode_with_offsets(text).unwrap();
        assert_eq!(a, b, "{text:?}");
        assert_eq!(ours.decode(&a.0).unwrap(), reference.decode(&b.0).unwrap());
    }
    assert!(!ours.encode(SAMPLES[1], false).unwrap().is_empty());
    assert_eq!(ours.eos_id, reference.eos_id);
    assert_eq!(ours.eos.as_deref(), Some("<|im_end|>"));
    assert_eq!(ours.chat_template, reference.chat_template);
    assert_eq!(ours.vocab_size(), reference.vocab_size());
}

/// A Llama-2-style SentencePiece vocabulary (`tokenizer.ggml.model = llama`): pieces merge by
/// score, highest first (`ll`, then `▁h`, `llo`, `▁he`, `▁hello`), spaces are `▁`, a space is
/// put before the text unless `add_space_prefix` is false, characters no piece covers fall back
/// to their bytes, and decoding undoes all of it. Expected pieces worked out by hand from
/// llama.cpp's algorithm.
#[test]
fn sentencepiece_gguf_tokenizer_merges_by_score_with_space_prefix_and_byte_fallback() {
    // (piece, type, score): 1 normal, 2 unknown, 3 control, 6 byte
    let vocab: &[(&str, u32, f64)] = &[
        ("<unk>", 2, 0.0),
        ("<s>", 3, 0.0),
        ("</s>", 3, 0.0),
        ("<0x21>", 6, 0.0),
        ("<0x0A>", 6, 0.0),
        ("\u{2581}", 1, -1.0),
        ("h", 1, -2.0),
        ("e", 1, -2.1),
        ("l", 1, -2.2),
        ("o", 1, -2.3),
        ("w", 1, -2.4),
        ("r", 1, -2.5),
        ("d", 1, -2.6),
        ("ll", 1, -3.0),
        ("\u{2581}h", 1, -4.0),
        ("llo", 1, -5.0),
        ("\u{2581}he", 1, -6.0),
        ("lo", 1, -7.0),
        ("\u{2581}hello", 1, -8.0),
        ("\u{2581}w", 1, -9.0),
        ("or", 1, -10.0),
        ("ld", 1, -11.0),
        ("\u{2581}wor", 1, -12.0),
        ("\u{2581}world", 1, -13.0),
    ];
    let meta = |space_prefix: Option<bool>| {
        let mut m: Vec<(&str, serde_json::Value)> = vec![
            ("general.architecture", "llama".into()),
            ("tokenizer.ggml.model", "llama".into()),
            (
                "tokenizer.ggml.tokens",
                vocab.iter().map(|v| v.0).collect::<Vec<_>>().into(),
            ),
            (
                "tokenizer.ggml.token_type",
                vocab.iter().map(|v| v.1).collect::<Vec<_>>().into(),
            ),
            (
                "tokenizer.ggml.scores",
                vocab.iter().map(|v| v.2 - 0.5).collect::<Vec<_>>().into(),
            ),
            ("tokenizer.ggml.bos_token_id", 1.into()),
            ("tokenizer.ggml.eos_token_id", 2.into()),
            ("tokenizer.ggml.add_bos_token", true.into()),
        ];
        if let Some(p) = space_prefix {
            m.push(("tokenizer.ggml.add_space_prefix", p.into()));
        }
        m
    };
    let id = |piece: &str| vocab.iter().position(|v| v.0 == piece).unwrap() as u32;
    let d = tempfile::tempdir().unwrap();
    // no add_space_prefix key: llama.cpp's default for SentencePiece is a space prefix
    let path = d.path().join("spm.gguf");
    write_gguf(&path, &meta(None));
    let tok = TextTokenizer::open(&path).unwrap();
    let text = "hello world!\nhold";
    let want: Vec<u32> = [
        "<s>",
        "\u{2581}hello",
        "\u{2581}world",
        "<0x21>",
        "<0x0A>",
        "h",
        "o",
        "ld",
    ]
    .iter()
    .map(|p| id(p))
    .collect();
    assert_eq!(tok.encode(text, true).unwrap(), want);
    assert_eq!(tok.decode(&want[1..]).unwrap(), text);
    assert_eq!(tok.bos.as_deref(), Some("<s>"));

    let path = d.path().join("spm-no-prefix.gguf");
    write_gguf(&path, &meta(Some(false)));
    let tok = TextTokenizer::open(&path).unwrap();
    let want: Vec<u32> = ["h", "e", "llo", "\u{2581}world"]
        .iter()
        .map(|p| id(p))
        .collect();
    assert_eq!(tok.encode("hello world", false).unwrap(), want);
    assert_eq!(tok.decode(&want).unwrap(), "hello world");
}

#[test]
fn unsupported_gguf_tokenizers_are_named() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("t.gguf");
    write_gguf(&path, &tiny_meta("falcon"));
    let e = TextTokenizer::open(&path).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer.ggml.pre") && e.contains("falcon") && e.contains("smollm"),
        "{e}"
    );
    let mut meta = tiny_meta("gpt2");
    meta[1].1 = "bert".into();
    write_gguf(&path, &meta);
    let e = TextTokenizer::open(&path).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("bert") && e.contains("SentencePiece"),
        "{e}"
    );
    // a SentencePiece vocabulary needs its scores
    meta[1].1 = "llama".into();
    write_gguf(&path, &meta);
    let e = TextTokenizer::open(&path).err().unwrap().to_string();
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    write_gguf(&path, &meta[..1]);
    let e = TextTokenizer::open(&path).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("missing"),
        "{e}"
    );
}

/// Real-model tests need `bash scripts/fetch-real.sh`; without it they say so and pass.
pub fn real_cache() -> Option<PathBuf> {
    let c = std::env::var_os("LORAKIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/lorakit"));
    if c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").is_file() {
        Some(c)
    } else {
        let why = format!(
            "{} has no real models; run `bash scripts/fetch-real.sh` (CI does)",
            c.display()
        );
        // CI fetches the real models first: there a skip means a broken setup
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true, but {why}"
        );
        eprintln!("SKIPPED: {why}");
        None
    }
}

#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let Some(cache) = real_cache() else { return };
    let tok = TextTokenizer::open(&cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/real/smollm2_tokens.json")).unwrap(),
    )
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), text);
    }
    assert_eq!(tok.eos_id, Some(2));
    assert_eq!(tok.eos.as_deref(), Some("<|im_end|>"));
    assert!(tok
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
}

/// A SentencePiece GGUF (Gemma 3's 262,144 pieces, user-defined `\n` and space runs, byte
/// fallback, no space prefix) against llama.cpp's own tokenizer
/// (tests/fixtures/make_gemma3_fixtures.py --tokens): BOS added, special tokens parsed.
#[test]
fn gemma3_gguf_sentencepiece_tokenizer_matches_llama_cpp() {
    let Some(cache) = real_cache() else { return };
    let start = std::time::Instant::now();
    let tok = TextTokenizer::open(&cache.join("gemma3/gemma-3-270m-q4_k_m.gguf")).unwrap();
    eprintln!("built in {:.2} s", start.elapsed().as_secs_f64());
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/real/gemma3_tokens.json")).unwrap(),
    )
    .unwrap();
    let mut byte_fallback = 0;
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        // decoding gives the text back (after the BOS)
        assert_eq!(tok.decode(&want[1..]).unwrap(), text);
        byte_fallback += want
            .iter()
            .filter(|&&i| (238..238 + 256).contains(&i))
            .count();
    }
    assert!(
        byte_fallback > 0,
        "the fixture texts exercise byte fallback"
    );
    assert_eq!(tok.eos_id, Some(1));
    assert_eq!(tok.bos.as_deref(), Some("<bos>"));
    assert!(
        tok.chat_template.is_none(),
        "a base model has no chat template"
    );
}
