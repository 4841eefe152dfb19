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

/// Starts `bursar simulate` on port 0 with `args` and returns it with its base URL.
// The child is owned by the returned `Server`, whose drop kills and reaps it.
#[allow(clippy::zombie_processes)]
pub fn start_simulator(args: &[&str]) -> Server {
    let child = Command::new(BIN)
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(child, "simulated provider is ready")
}

/// Starts `bursar serve` on port 0 with the store given by `store_args` (`--data-dir …`
/// or `--database-url …`) and reads the bound address from its ready log line.
pub fn start_on(store_args: &[OsString], config: &Path) -> Server {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .args(store_args);
    start_command(command)
}

/// Starts `bursar serve` as `command` sets it up (arguments, environment, directory)
/// and returns it once ready.
// The child is owned by the returned `Server`, whose drop kills and reaps it.
#[allow(clippy::zombie_processes)]
pub fn start_command(mut command: Command) -> Server {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(child, "bursar is ready")
}

/// Reads a child's JSON logs until `ready` and returns it with the address it logged.
fn wait_ready(mut child: Child, ready: &str) -> Server {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "{ready}: not seen in time");
        let line = lines
            .next()
            .expect("the process exited before it was ready")
            .unwrap();
        if line.contains(ready) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let listen = v["fields"]["listen"].as_str().unwrap().to_string();
            // Keep draining the logs so the process never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return Server {
                child,
                base: format!("http://{listen}"),
            };
        }
    }
}
