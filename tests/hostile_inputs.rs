//! Inputs an adversarial probe found crashing, hanging or misleading lorakit, each run through
//! the binary under a memory limit (`ulimit -v`) and a hang guard: exit status 1, one paragraph
//! on stderr naming the file and the field at fault, no panic or abort, nothing written.
mod common;

use common::{gguf, gguf_str, root};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address-space limit for every run: far above what these tiny cases need, far below the
/// allocations the defects made (600 GB for a billion layers, 4.8 GB for a 150 MB GGUF array).
const MEMORY_LIMIT_KB: u64 = 4 << 20;
/// A run still going after this long is a hang (each case takes well under a second).
const HANG: Duration = Duration::from_secs(60);

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
        for f in ["capitals-train.jsonl", "capitals-chat-eval.jsonl"] {
            std::fs::copy(root().join("examples/data").join(f), dir.join(f)).unwrap();
        }
        Scratch { _tmp: tmp, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    /// Edits the JSON file `name` in place.
    fn edit_json(&self, name: &str, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.path(name)).unwrap()).unwrap();
        f(&mut v);
        self.write(name, v.to_string());
    }

    /// A copy of the tiny model under `name`, `edit`ed.
    fn model_copy(&self, name: &str) -> String {
        std::fs::create_dir(self.path(name)).unwrap();
        for e in std::fs::read_dir(self.path("model")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), self.path(name).join(e.file_name())).unwrap();
        }
        name.to_string()
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = walk(&self.dir);
        v.sort();
        v
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.display().to_string());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// Runs lorakit in `s` under the memory limit; returns (exit code, stderr) or fails on a hang.
fn run_bounded(s: &Scratch, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_LIMIT_KB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_lorakit"))
        .args(args)
        .current_dir(&s.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            panic!("{args:?} still running after {HANG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The universal promises of a refused input, plus `expect` (substrings of stderr).
fn refused(name: &str, s: &Scratch, args: &[&str], expect: &[&str]) {
    let before = s.entries();
    let (code, err) = run_bounded(s, args);
    assert_eq!(code, Some(1), "[{name}] exit status {code:?}: {err}");
    assert!(err.starts_with("error: "), "[{name}] {err}");
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "[{name}] {err}"
    );
    assert!(
        !err.trim_end().contains("\n\n"),
        "[{name}] more than one paragraph: {err}"
    );
    for e in expect {
        assert!(err.contains(e), "[{name}] expected {e:?} in: {err}");
    }
    assert_eq!(before, s.entries(), "[{name}] files appeared or vanished");
}

/// An adapter for the tiny model: `targets` in the config, tensors for `tensors` (module paths).
fn adapter(s: &Scratch, name: &str, config: serde_json::Value, tensors: &[&str]) -> String {
    let dir = s.path(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("model/config.json")).unwrap())
            .unwrap();
    let hidden = cfg["hidden_size"].as_u64().unwrap() as usize;
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let kv = cfg["num_key_value_heads"].as_u64().unwrap_or(heads as u64) as usize;
    let dev = candle_core::Device::Cpu;
    let mut map = std::collections::HashMap::new();
    for m in tensors {
        let out = if m.ends_with("q_proj") {
            hidden
        } else {
            hidden / heads * kv
        };
        let r = config["r"].as_u64().unwrap() as usize;
        let key = |w: &str| format!("base_model.model.{m}.lora_{w}.weight");
        map.insert(
            key("A"),
            candle_core::Tensor::ones((r, hidden), candle_core::DType::F32, &dev).unwrap(),
        );
        map.insert(
            key("B"),
            candle_core::Tensor::ones((out, r), candle_core::DType::F32, &dev).unwrap(),
        );
    }
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
    name.to_string()
}

#[test]
fn merge_and_eval_read_an_adapter_the_same_way() {
    let s = Scratch::new();
    let cases = [
        (
            "config targets k_proj, q_proj; tensors for q_proj, v_proj",
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                "target_modules": ["k_proj", "q_proj"]}),
            vec![
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj",
            ],
            "v_proj",
        ),
        (
            "layers_to_transform [0], tensors for layer 1",
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                "target_modules": ["q_proj"], "layers_to_transform": [0]}),
            vec![
                "model.layers.0.self_attn.q_proj",
                "model.layers.1.self_attn.q_proj",
            ],
            "layers.1",
        ),
    ];
    for (i, (name, config, tensors, names)) in cases.into_iter().enumerate() {
        let ad = adapter(&s, &format!("ad{i}"), config, &tensors);
        for cmd in [
            vec![
                "eval",
                "--model",
                "model",
                "--adapter",
                &ad,
                "--data",
                "capitals-train.jsonl",
            ],
            vec![
                "merge",
                "--base",
                "model",
                "--adapter",
                &ad,
                "--out",
                "merged",
            ],
            vec![
                "generate",
                "--model",
                "model",
                "--adapter",
                &ad,
                "--prompt",
                "x",
            ],
        ] {
            refused(
                &format!("{name}: {}", cmd[0]),
                &s,
                &cmd,
                &["adapter_config.json", "does not target", names],
            );
        }
    }
    // the adapter those configs do describe merges
    let ad = adapter(
        &s,
        "ok",
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
            "target_modules": ["q_proj"], "layers_to_transform": [0]}),
        &["model.layers.0.self_attn.q_proj"],
    );
    let (code, err) = run_bounded(
        &s,
        &["merge", "--base", "model", "--adapter", &ad, "--out", "m"],
    );
    assert_eq!(code, Some(0), "{err}");
    // and one that misses a module its config targets is refused by merge as by eval
    let ad = adapter(
        &s,
        "short",
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
            "target_modules": ["q_proj"]}),
        &["model.layers.0.self_attn.q_proj"],
    );
    for cmd in [
        vec![
            "eval",
            "--model",
            "model",
            "--adapter",
            &ad,
            "--data",
            "capitals-train.jsonl",
        ],
        vec![
            "merge",
            "--base",
            "model",
            "--adapter",
            &ad,
            "--out",
            "merged",
        ],
    ] {
        refused(
            &format!("missing targeted module: {}", cmd[0]),
            &s,
            &cmd,
            &["model.layers.1.self_attn.q_proj.lora_A.weight", "missing"],
        );
    }
}

#[test]
fn numbers_that_are_not_numbers_are_failures() {
    let s = Scratch::new();
    let loud = adapter(
        &s,
        "loud",
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 1e308,
            "target_modules": ["q_proj", "v_proj"]}),
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ],
    );
    refused(
        "eval with lora_alpha 1e308",
        &s,
        &[
            "eval",
            "--model",
            "model",
            "--adapter",
            &loud,
            "--data",
            "capitals-train.jsonl",
            "--json",
        ],
        &["capitals-train.jsonl", "NaN", "lora_alpha"],
    );
    refused(
        "generate with lora_alpha 1e308",
        &s,
        &[
            "generate",
            "--model",
            "model",
            "--adapter",
            &loud,
            "--prompt",
            "The capital",
        ],
        &["logit", "lora_alpha"],
    );
    s.write(
        "two-cities.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Capital of Italy?\"}, {\"role\": \"assistant\", \"content\": \"Rome\"}]}\n",
    );
    refused(
        "eval --labels with lora_alpha 1e308",
        &s,
        &[
            "eval",
            "--model",
            "model",
            "--adapter",
            &loud,
            "--data",
            "two-cities.jsonl",
            "--format",
            "chat",
            "--labels",
            "Paris,Rome",
        ],
        &["label score", "lora_alpha"],
    );
    for (key, value) in [
        ("rms_norm_eps", serde_json::json!(-1.0)),
        ("rope_theta", serde_json::json!(0.0)),
    ] {
        let m = s.model_copy(&format!("m-{key}"));
        s.edit_json(&format!("{m}/config.json"), |v| v[key] = value.clone());
        for cmd in [
            vec!["eval", "--model", &m, "--data", "capitals-train.jsonl"],
            vec!["generate", "--model", &m, "--prompt", "x"],
        ] {
            refused(
                &format!("{key}: {}", cmd[0]),
                &s,
                &cmd,
                &["config.json", key, "positive"],
            );
        }
    }
}

fn llama_meta(block_count: u32) -> Vec<(&'static str, u32, Vec<u8>)> {
    vec![
        ("general.architecture", 8, gguf_str("llama")),
        ("llama.block_count", 4, block_count.to_le_bytes().to_vec()),
        ("llama.embedding_length", 4, 8u32.to_le_bytes().to_vec()),
        ("llama.feed_forward_length", 4, 12u32.to_le_bytes().to_vec()),
        ("llama.attention.head_count", 4, 2u32.to_le_bytes().to_vec()),
        ("llama.context_length", 4, 64u32.to_le_bytes().to_vec()),
    ]
}

const ONE_LAYER: [(&str, [u64; 2]); 4] = [
    ("token_embd.weight", [8, 16]),
    ("blk.0.attn_q.weight", [8, 8]),
    ("blk.0.ffn_down.weight", [12, 8]),
    ("output_norm.weight", [8, 1]),
];

#[test]
fn sizes_are_checked_against_the_tensors_present() {
    let s = Scratch::new();
    for (name, layers) in [
        ("a billion layers", serde_json::json!(1_000_000_000u64)),
        ("2^62 layers", serde_json::json!(1u64 << 62)),
    ] {
        let m = s.model_copy(&format!("m-{}", name.replace(' ', "-").replace('^', "")));
        s.edit_json(&format!("{m}/config.json"), |v| {
            v["num_hidden_layers"] = layers.clone()
        });
        for cmd in [
            vec!["inspect", &m],
            vec!["eval", "--model", &m, "--data", "capitals-train.jsonl"],
            vec!["generate", "--model", &m, "--prompt", "x"],
        ] {
            refused(
                &format!("{name}: {}", cmd[0]),
                &s,
                &cmd,
                &["config.json", "num_hidden_layers", "holds only 2 layers"],
            );
        }
    }
    s.write("huge-blocks.gguf", gguf(&llama_meta(u32::MAX), &ONE_LAYER));
    for cmd in [
        vec!["inspect", "huge-blocks.gguf"],
        vec!["generate", "--model", "huge-blocks.gguf", "--prompt", "x"],
        vec!["convert", "huge-blocks.gguf", "--out", "converted"],
    ] {
        refused(
            &format!("GGUF block_count 2^32-1: {}", cmd[0]),
            &s,
            &cmd,
            &[
                "huge-blocks.gguf",
                "llama.block_count",
                "4294967295",
                "1 layers",
            ],
        );
    }
    s.write("empty.gguf", gguf(&llama_meta(1), &[]));
    refused(
        "GGUF without tensors",
        &s,
        &["inspect", "empty.gguf"],
        &["empty.gguf", "no tensors"],
    );
}

#[test]
fn gguf_metadata_arrays_take_about_their_size_in_memory() {
    let s = Scratch::new();
    // one u8 array of 150 MB: 32 bytes an item would need 4.8 GB, over the run's 4 GiB limit
    let n: u64 = 150 << 20;
    let mut payload = 0u32.to_le_bytes().to_vec(); // item type u8
    payload.extend(n.to_le_bytes());
    payload.extend(vec![7u8; n as usize]);
    let mut meta = llama_meta(1);
    meta.push(("lorakit.test.blob", 9, payload));
    s.write("blob.gguf", gguf(&meta, &ONE_LAYER));
    let (code, err) = run_bounded(&s, &["inspect", "blob.gguf"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn chat_templates_and_conversations_are_bounded() {
    let s = Scratch::new();
    let with_template = |name: &str, template: &str| {
        let m = s.model_copy(name);
        s.edit_json(&format!("{m}/tokenizer_config.json"), |v| {
            v["chat_template"] = template.into()
        });
        m
    };
    let two = with_template(
        "loops2",
        "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
    );
    refused(
        "two nested loops: generate --chat",
        &s,
        &["generate", "--model", &two, "--chat", "hi"],
        &["tokenizer_config.json", "chat template"],
    );
    let three = with_template(
        "loops3",
        "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}{{ k }}{% endfor %}{% endfor %}{% endfor %}",
    );
    refused(
        "three nested loops: eval --format chat",
        &s,
        &[
            "eval",
            "--model",
            &three,
            "--data",
            "capitals-chat-eval.jsonl",
            "--format",
            "chat",
        ],
        &["capitals-chat-eval.jsonl", "chat template"],
    );

    // one conversation of 200k turns on one line: linear, not quadratic, in the turns
    let mut messages = Vec::new();
    for i in 0..100_000 {
        messages.push(serde_json::json!({"role": "user", "content": format!("q{i}")}));
        messages.push(serde_json::json!({"role": "assistant", "content": "a"}));
    }
    let line = serde_json::json!({ "messages": messages }).to_string();
    assert!(line.len() < 16 << 20);
    s.write("long-chat.jsonl", format!("{line}\n"));
    let (code, err) = run_bounded(
        &s,
        &[
            "eval",
            "--model",
            "model",
            "--data",
            "long-chat.jsonl",
            "--format",
            "chat",
            "--max-seq-len",
            "64",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn checkpoint_state_is_validated_before_resuming() {
    let s = Scratch::new();
    let recipe = format!(
        "model:\n  path: model\ndata:\n  train: capitals-train.jsonl\n  format: completion\n  max_seq_len: 32\nlora:\n  r: 2\n  target_modules: [q_proj]\ntrain:\n  max_steps: 4\n  batch_size: 8\n  save_every: 2\noutput:\n  dir: {}\n",
        s.path("run").display()
    );
    s.write("recipe.yaml", &recipe);
    let (code, err) = run_bounded(&s, &["train", "recipe.yaml"]);
    assert_eq!(code, Some(0), "{err}");
    let state = s.path("run/checkpoints/step-4/state.json");
    let good = std::fs::read_to_string(&state).unwrap();
    let cases = [
        (
            "step_in_epoch 1e15",
            "step_in_epoch",
            serde_json::json!(1_000_000_000_000_000u64),
            ["step_in_epoch", "1000000000000000"],
        ),
        (
            "step 2^64-1",
            "step",
            serde_json::json!(u64::MAX),
            ["step", "18446744073709551615"],
        ),
        (
            "epoch that does not match the step",
            "epoch",
            serde_json::json!(7),
            ["epoch", "does not match"],
        ),
    ];
    for (name, key, value, expect) in cases {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v[key] = value;
        std::fs::write(&state, v.to_string()).unwrap();
        let mut want = vec!["state.json"];
        want.extend(expect);
        refused(name, &s, &["train", "recipe.yaml", "--resume"], &want);
    }
}

#[test]
fn recipes_and_flags_name_what_is_wrong() {
    let s = Scratch::new();
    let recipe = |extra_lora: &str, data: &str| {
        format!(
            "model:\n  path: model\ndata:\n  train: {data}\n  format: completion\nlora:\n  r: 4\n{extra_lora}train:\n  max_steps: 1\noutput:\n  dir: out\n"
        )
    };
    // the YAML parser's time grows faster than the depth (100k levels: 25–75 s)
    for (name, text) in [
        (
            "flow mappings",
            format!(
                "model: {}1{}\n",
                "{a: ".repeat(100_000),
                "}".repeat(100_000)
            ),
        ),
        (
            "flow sequences",
            format!("model: {}\n", "[ ".repeat(100_000)),
        ),
    ] {
        s.write("deep.yaml", text);
        refused(
            &format!("100k nested {name}"),
            &s,
            &["train", "deep.yaml"],
            &["deep.yaml", "nested", "line 1"],
        );
    }
    s.write(
        "neg.yaml",
        recipe("", "capitals-train.jsonl").replace("r: 4", "r: -4"),
    );
    refused(
        "r: -4",
        &s,
        &["train", "neg.yaml"],
        &[
            "neg.yaml: lora.r: invalid",
            "expected a whole number >= 0",
            "line 7",
        ],
    );
    s.write(
        "flow.yaml",
        recipe("", "capitals-train.jsonl").replace("lora:\n  r: 4\n", "lora: {r: -4}\n"),
    );
    refused(
        "lora: {r: -4}",
        &s,
        &["train", "flow.yaml"],
        &["flow.yaml: lora.r: invalid", "expected a whole number >= 0"],
    );
    s.write("ok.yaml", recipe("", "capitals-train.jsonl"));
    refused(
        "--set lora.r=-4",
        &s,
        &["train", "ok.yaml", "--set", "lora.r=-4"],
        &[
            "ok.yaml: lora.r: invalid",
            "expected a whole number >= 0",
            "after --set",
        ],
    );
    s.write("zero.yaml", recipe("", "/dev/zero"));
    refused(
        "/dev/zero as data",
        &s,
        &["train", "zero.yaml"],
        &["data.train", "/dev/zero", "not a regular file"],
    );
    refused(
        "eval on /dev/zero",
        &s,
        &["eval", "--model", "model", "--data", "/dev/zero"],
        &["/dev/zero", "not a regular file"],
    );
    refused(
        "eval --batch-size 0",
        &s,
        &[
            "eval",
            "--model",
            "model",
            "--data",
            "capitals-train.jsonl",
            "--batch-size",
            "0",
        ],
        &["--batch-size"],
    );
    refused(
        "eval --max-seq-len 0",
        &s,
        &[
            "eval",
            "--model",
            "model",
            "--data",
            "capitals-train.jsonl",
            "--max-seq-len",
            "0",
        ],
        &["--max-seq-len"],
    );
}
