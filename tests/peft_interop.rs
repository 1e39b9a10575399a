//! Adapters cross between lorakit and PEFT: PEFT loads a lorakit-trained adapter with no missing
//! or unexpected keys and computes the same eval loss, and `lorakit eval` reproduces the loss
//! PEFT computes for a PEFT-made adapter (numbers from tests/fixtures/make_peft_fixtures.py --interop).
mod common;
use common::root;
use std::process::Command;

fn expected() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/trained/expected.json")).unwrap(),
    )
    .unwrap()
}

fn eval_loss(adapter: Option<&str>) -> (f64, u64) {
    eval_loss_on("examples/tiny-llama", adapter)
}

fn eval_loss_on(model: &str, adapter: Option<&str>) -> (f64, u64) {
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--data",
        "examples/data/capitals-eval.jsonl",
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .current_dir(root())
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
}

/// Plain LoRA, DoRA (magnitude vectors) and PiSSA (saved for the original base, rank 2r).
#[test]
fn peft_loads_lorakit_adapters_and_agrees_on_the_loss() {
    let e = expected();
    for name in [
        "lorakit_adapter",
        "lorakit_dora_adapter",
        "lorakit_pissa_adapter",
    ] {
        let ours = &e[name];
        assert_eq!(ours["missing_lora_keys"], serde_json::json!([]), "{name}");
        assert_eq!(ours["unexpected_keys"], serde_json::json!([]), "{name}");
        let (loss, tokens) = eval_loss(Some(&format!("tests/fixtures/trained/{name}")));
        assert_eq!(
            tokens,
            e["tokens"].as_u64().unwrap(),
            "token counting differs from the reference"
        );
        let peft = ours["peft_loss"].as_f64().unwrap();
        assert!(
            (loss - peft).abs() <= 1e-4,
            "{name}: lorakit {loss} vs PEFT {peft}"
        );
        // and the adapter matters: it is far from the base loss
        assert!(e["base_loss"].as_f64().unwrap() - peft > 1.0, "{name}");
    }
    let dora = std::fs::read_to_string(
        root().join("tests/fixtures/trained/lorakit_dora_adapter/adapter_config.json"),
    )
    .unwrap();
    assert!(dora.contains("\"use_dora\": true"), "{dora}");
}

#[test]
fn lorakit_eval_reproduces_peft_losses() {
    let e = expected();
    let (base, _) = eval_loss(None);
    let want = e["base_loss"].as_f64().unwrap();
    assert!(
        (base - want).abs() <= 1e-4,
        "base: lorakit {base} vs reference {want}"
    );
    let (loss, _) = eval_loss(Some("tests/fixtures/trained/peft_adapter"));
    let want = e["peft_adapter"]["peft_loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() <= 1e-4,
        "PEFT adapter: lorakit {loss} vs PEFT {want}"
    );
    assert!(
        (loss - base).abs() > 1e-3,
        "the PEFT adapter changes nothing"
    );
}

/// Adapters lorakit trained on tiny Gemma 3, GPT-2, Qwen3 and Phi-3 bases (GPT-2's saved with
/// `fan_in_fan_out: true` for its Conv1D layers): PEFT loads them with no missing or unexpected
/// keys and computes lorakit's eval loss, base and adapted.
#[test]
fn peft_loads_lorakit_adapters_of_the_newer_families() {
    let e = expected();
    for fam in ["gemma3", "gpt2", "qwen3", "phi3"] {
        let name = format!("lorakit_{fam}_adapter");
        let ours = &e[&name];
        assert_eq!(ours["missing_lora_keys"], serde_json::json!([]), "{name}");
        assert_eq!(ours["unexpected_keys"], serde_json::json!([]), "{name}");
        let base = format!("tests/fixtures/trained/{fam}_base");
        let adapter = format!("tests/fixtures/trained/{name}");
        for (got, want) in [
            (eval_loss_on(&base, None).0, &ours["base_loss"]),
            (eval_loss_on(&base, Some(&adapter)).0, &ours["peft_loss"]),
        ] {
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-4,
                "{fam}: lorakit {got} vs PEFT {want}"
            );
        }
        assert!(
            ours["base_loss"].as_f64().unwrap() - ours["peft_loss"].as_f64().unwrap() > 1.0,
            "{fam}: the adapter matters"
        );
    }
    let gpt2 = std::fs::read_to_string(
        root().join("tests/fixtures/trained/lorakit_gpt2_adapter/adapter_config.json"),
    )
    .unwrap();
    assert!(gpt2.contains("\"fan_in_fan_out\": true"), "{gpt2}");
}
