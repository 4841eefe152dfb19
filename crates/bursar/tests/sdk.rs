//! The official `openai` and `anthropic` Python SDKs against the real `bursar` binary in
//! proxy mode with the simulated provider (the checks are in `tests/sdk/test_sdks.py`).
//!
//! Without the SDKs installed the test is skipped with a loud notice; with
//! `BURSAR_REQUIRE_SDK=1` (set by `.ci/run`, which installs them) a missing SDK fails.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

const CONFIG: &str = r#"
[[plans]]
id = "pro"
default_task = "chat"
[plans.tasks.chat]
classes = ["small", "standard"]
default_class = "small"
max_tokens = 1000
[plans.tasks.embed]
classes = ["embedding"]
default_class = "embedding"
max_tokens = 1
[plans.rate_limits.limited]
requests_per_minute = 2

[[tenants]]
id = "acme"
plan = "pro"
[[tenants]]
id = "broke"
plan = "pro"

[[users]]
tenant = "acme"
id = "lim"
role = "limited"

[[keys]]
name = "member"
tenant = "acme"
kind = "member"
secret = "bsr_sdk_member_key_00000000000000"
[[keys]]
name = "limited"
tenant = "acme"
user = "lim"
kind = "member"
secret = "bsr_sdk_limited_key_0000000000000"
[[keys]]
name = "broke"
tenant = "broke"
kind = "member"
secret = "bsr_sdk_broke_key_000000000000000"

[[budgets]]
id = "broke-life"
tenant = "broke"
scope = "tenant"
window = "lifetime"
limit = "0.000001"

# Real Anthropic- and OpenAI-style providers (the simulator over HTTP): each SDK reaches
# the other dialect's model through translation.
[[providers]]
name = "anthropic-upstream"
kind = "anthropic"
base_url = "SIMULATOR"
models = ["claude-haiku-4-5"]
[[providers]]
name = "openai-upstream"
kind = "openai"
base_url = "SIMULATOR"
models = ["gpt-4.1-nano"]

[[providers]]
name = "sim"
kind = "simulated"
serves = ["*"]
[providers.simulate]
completion_tokens = 20
"#;

fn sdks_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn official_python_sdks_work_against_bursar() {
    if !sdks_installed() {
        assert!(
            std::env::var("BURSAR_REQUIRE_SDK").is_err(),
            "BURSAR_REQUIRE_SDK is set but the openai and anthropic Python packages are missing"
        );
        eprintln!(
            "\n*** SKIPPED official_python_sdks_work_against_bursar: `pip install openai anthropic` to run it ***\n"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bursar.toml");
    let simulator = common::start_simulator(&["--completion-tokens", "16"]);
    std::fs::write(&config, CONFIG.replace("SIMULATOR", &simulator.base)).unwrap();
    let server = common::start(&tmp.path().join("data"), &config);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_sdks.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&server.base)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all 12 SDK checks passed"), "{stdout}");
    eprintln!("{stdout}");
}
