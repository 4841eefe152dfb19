//! The real `bursar` binary, started for a test.
// Shared by several test crates; each uses part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bursar");

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bursar serve` on port 0 over the embedded store in `dir`.
pub fn start(dir: &Path, config: &Path) -> Server {
    start_on(&["--data-dir".into(), dir.into()], config)
}

/// Starts `bursar serve` on port 0 with the store given by `store_args` (`--data-dir …`
/// or `--database-url …`) and reads the bound address from its ready log line.
// The child is owned by the returned `Server`, whose drop kills and reaps it.
#[allow(clippy::zombie_processes)]
pub fn start_on(store_args: &[OsString], config: &Path) -> Server {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .args(store_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "bursar did not start");
        let line = lines
            .next()
            .expect("bursar exited before it was ready")
            .unwrap();
        if line.contains("bursar is ready") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let listen = v["fields"]["listen"].as_str().unwrap().to_string();
            // Keep draining the logs so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return Server {
                child,
                base: format!("http://{listen}"),
            };
        }
    }
}
