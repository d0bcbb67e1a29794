//! Real processes: the `coordinator`, `commserver`, `meshctl` and `simulation` binaries, started on port 0
//! and found through their `listening on` log line.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use crate::PATIENCE;

/// Path of a workspace binary next to the test executable (`target/<profile>/<name>`).
///
/// The first call (re)builds the binaries with the cargo that runs the tests, so a test never
/// exercises a stale binary, even under `cargo test -p relaymesh-tests`. (Cargo holds no lock
/// while tests run; after `cargo test --workspace` this is a quick no-op.)
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .unwrap()
            .to_owned();
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_owned();
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "--bins"]);
        build.args(["-p", "coordinator", "-p", "commserver", "-p", "meshctl"]);
        build.args(["-p", "simulation"]);
        if profile != "debug" {
            build.args(["--profile", &profile]);
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building the binaries failed");
        dir
    });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing after building the binaries",
        path.display()
    );
    path
}

/// The directory holding the workspace binaries (built first, as [`binary`] does).
pub fn binaries_dir() -> PathBuf {
    binary("meshctl").parent().unwrap().to_owned()
}

/// Runs `script` with bash in `dir`, with none of the variables relaymesh reads set, in a
/// process group of its own; when it ends (or after `timeout`, which fails the test) the whole
/// group is killed, so nothing it started in the background outlives it. Returns (success,
/// stdout, stderr).
pub fn run_script(
    script: &str,
    dir: &std::path::Path,
    timeout: Duration,
) -> (bool, String, String) {
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .process_group(0);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RELAYMESH_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let group = child.id().to_string();
    let kill_group = || {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status();
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Background processes keep the pipes open: end them before reading to the end.
    kill_group();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let Some(status) = status else {
        panic!("the script did not finish within {timeout:?}\nstdout:\n{out}\nstderr:\n{err}");
    };
    (status.success(), out, err)
}

/// Reads a pipe to its end on a thread of its own.
fn read_all(mut pipe: Box<dyn std::io::Read + Send>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Runs `binary` to completion (at most [`PATIENCE`]); returns (success, stdout, stderr).
pub fn run(name: &str, args: &[&str]) -> (bool, String, String) {
    run_with_env(name, args, &[])
}

/// [`run`] with only `env` set of the variables relaymesh reads (`RUST_LOG`,
/// `RELAYMESH_CLUSTER_SECRET`, `RELAYMESH_COORDINATOR`, the account and key variables).
pub fn run_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut child = Command::new(binary(name))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RELAYMESH_CLUSTER_SECRET")
        .env_remove("RELAYMESH_COORDINATOR")
        .env_remove("RELAYMESH_ACCOUNT")
        .env_remove("RELAYMESH_ACCESS_CODE")
        .env_remove("RELAYMESH_KEY_FILE")
        .env_remove("RELAYMESH_ACCOUNTS_URL")
        .env_remove("RELAYMESH_DISPATCH_SECRET")
        .env_remove("RELAYMESH_ADMIN_TOKEN")
        .env_remove("RELAYMESH_ADMIN")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{name} {args:?} did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.success(), out.join().unwrap(), err.join().unwrap())
}

/// A directory of this test process under the temp directory (made if missing).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relaymesh-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running binary whose stdout and stderr are collected line by line. Killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// The child process.
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    stdout: mpsc::Receiver<String>,
    /// Every stderr line seen so far.
    pub seen: Vec<String>,
}

fn forward_lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    /// Starts `binary` with `args` and the test cluster secret in its environment.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with_secret(name, args, Some(crate::SECRET))
    }

    /// Starts `binary` with `args`, and `secret` (if any) as `RELAYMESH_CLUSTER_SECRET`.
    pub fn start_with_secret(name: &str, args: &[&str], secret: Option<&str>) -> Self {
        let env: Vec<(&str, &str)> = secret
            .map(|s| ("RELAYMESH_CLUSTER_SECRET", s))
            .into_iter()
            .collect();
        Self::start_with_env(name, args, &env)
    }

    /// Starts `binary` with `args` and, of the variables relaymesh reads, only `env` (and
    /// `RUST_LOG=info`).
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(Command::new(binary(name)), args, env)
    }

    /// Starts another program (e.g. `unshare` wrapping a relaymesh binary) with `args`, as
    /// [`Proc::start`] starts a relaymesh binary: the test cluster secret and `RUST_LOG=info`.
    pub fn start_program(program: &str, args: &[&str]) -> Self {
        Self::spawn(
            Command::new(program),
            args,
            &[("RELAYMESH_CLUSTER_SECRET", crate::SECRET)],
        )
    }

    fn spawn(mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Self {
        command
            .env_remove("RELAYMESH_CLUSTER_SECRET")
            .env_remove("RELAYMESH_ADMIN_TOKEN")
            .envs(env.iter().copied());
        let mut child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = forward_lines(child.stderr.take().unwrap());
        let stdout = forward_lines(child.stdout.take().unwrap());
        Self {
            child,
            stderr,
            stdout,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?}; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The next line the process prints on stdout.
    pub fn next_stdout_line(&mut self) -> String {
        self.stdout
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no stdout line; stderr:\n{}", self.seen.join("\n")))
    }

    /// The address from the process's `listening on <addr>` line.
    pub fn listening_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_line("listening on ");
        let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        self.signal("TERM")
    }

    /// Sends `SIG<name>` and waits for the exit; returns whether it exited successfully.
    pub fn signal(&mut self, name: &str) -> bool {
        self.send_signal(name);
        self.wait_exit().success()
    }

    /// Sends `SIG<name>` (e.g. `STOP` to freeze the process, `CONT` to thaw it) and returns.
    pub fn send_signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "SIG{name} not sent");
    }

    /// Waits for the process to exit (at most [`PATIENCE`]).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for the process to exit (collecting its stderr meanwhile).
    pub fn wait_exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.stderr.try_recv() {
                    self.seen.push(line);
                }
                return status;
            }
            while let Ok(line) = self.stderr.try_recv() {
                self.seen.push(line);
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}; stderr:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the process dies without any chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
