//! Tests that run in a process of their own: this test binary started again, running one test.
//! Needed where state is once per process (a plugin reads its knobs in `init`, CUDA holds a context)
//! or where a fault must hit a real, separate process (a peer stopped or killed).
//!
//! Two shapes: [`ChildTest::run`] waits for the child and fails the parent if the child failed or
//! ran no test; [`ChildTest::spawn`] leaves it running as a peer that announces itself on stdout
//! and is killed when dropped. The child knows it is one by [`is_child`].

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// Names the test a child process was started for.
const CHILD_VAR: &str = "UCCL_TCPX_TEST_CHILD";

/// Whether this process is the child started to run test `name`.
pub fn is_child(name: &str) -> bool {
    std::env::var(CHILD_VAR).as_deref() == Ok(name)
}

/// A test of this binary, to be run in a child process.
pub struct ChildTest {
    name: String,
    cmd: Command,
    quiet: bool,
}

impl ChildTest {
    /// Test `name` (matched exactly), output uncaptured, one test thread.
    pub fn new(name: &str) -> ChildTest {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
        cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]).env(CHILD_VAR, name);
        ChildTest { name: name.to_owned(), cmd, quiet: false }
    }

    /// The child test is `#[ignore]`d, so that a normal run starts it only through its parent.
    pub fn ignored(mut self) -> ChildTest {
        self.cmd.arg("--ignored");
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> ChildTest {
        self.cmd.env(key, value);
        self
    }

    /// Takes every variable starting with `prefix` out of the child's environment (set them again
    /// with [`env`](Self::env) afterwards), so that knobs of the parent's shell do not leak in.
    pub fn env_cleared(mut self, prefix: &str) -> ChildTest {
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with(prefix)) {
                self.cmd.env_remove(key);
            }
        }
        self
    }

    /// Runs the child on test host `host` of `net`, in its network namespace: the same program,
    /// arguments and environment, started through `ip netns exec`, which execs it (so the child's
    /// process id is the test's own).
    pub fn on_host(mut self, net: &crate::netns::TestNet, host: usize) -> ChildTest {
        let mut cmd = net.command(host, self.cmd.get_program());
        cmd.args(self.cmd.get_args());
        for (key, value) in self.cmd.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        self.cmd = cmd;
        self
    }

    /// Drops the child's stderr (a peer's logs after the fault a test inflicts on it are noise).
    pub fn quiet(mut self) -> ChildTest {
        self.quiet = true;
        self
    }

    /// Runs the child to its end and returns its output, which it also prints. Fails the test if
    /// the child failed or did not run exactly its one test.
    pub fn run(self) -> String {
        let name = self.name.clone();
        let (status, text) = self.finish();
        assert!(status.success(), "child {name} failed ({status}):\n{text}");
        assert!(text.contains("1 passed"), "child {name} did not run its test:\n{text}");
        text
    }

    /// Runs the child to its end and returns how it ended and its output, which it also prints:
    /// for a child expected to fail (one that must exit where a plugin exits the process, say).
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let out = self.cmd.output().expect("spawn the test binary");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        print!("{text}");
        (out.status, text)
    }

    /// [`run`](Self::run), bounded: a child still running after `limit` is killed and fails the
    /// test with what it printed so far.
    pub fn run_within(mut self, limit: Duration) -> String {
        let name = self.name.clone();
        self.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.cmd.spawn().expect("spawn the test binary");
        let (tx, chunks) = std::sync::mpsc::channel();
        let drain = |mut pipe: Box<dyn std::io::Read + Send>, tx: std::sync::mpsc::Sender<String>| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                let _ = pipe.read_to_end(&mut text);
                let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
            })
        };
        let readers = [
            drain(Box::new(child.stdout.take().expect("piped stdout")), tx.clone()),
            drain(Box::new(child.stderr.take().expect("piped stderr")), tx),
        ];
        let deadline = std::time::Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                break Some(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for reader in readers {
            let _ = reader.join();
        }
        let text: String = chunks.try_iter().collect::<Vec<_>>().join("");
        print!("{text}");
        let Some(status) = status else { panic!("child {name} did not finish within {limit:?}:\n{text}") };
        assert!(status.success(), "child {name} failed ({status}):\n{text}");
        assert!(text.contains("1 passed"), "child {name} did not run its test:\n{text}");
        text
    }

    /// Starts the child and leaves it running; see [`Peer`].
    pub fn spawn(mut self) -> Peer {
        self.cmd.stdout(Stdio::piped());
        if self.quiet {
            self.cmd.stderr(Stdio::null());
        }
        let mut child = self.cmd.spawn().expect("spawn the test binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer { name: self.name, child, lines }
    }
}

/// A child test process left running; killed (SIGKILL) and reaped when dropped.
pub struct Peer {
    name: String,
    child: std::process::Child,
    lines: Receiver<String>,
}

impl Peer {
    /// Waits (bounded by `limit`) for the child's next stdout line containing `marker` and returns
    /// what follows the marker on it. Earlier lines are skipped (the harness may print
    /// "test NAME ... " on the same line first).
    pub fn announcement(&mut self, marker: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some((_, rest)) = line.split_once(marker) {
                        return rest.to_owned();
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("child {} printed no {marker:?} within {limit:?}", self.name),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    panic!("child {} exited ({status}) without printing {marker:?}", self.name)
                }
            }
        }
    }

    /// The child's process id, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps a peer process's test running (serving from its other threads) until the parent kills it.
pub fn park_until_killed() -> ! {
    loop {
        std::thread::park();
    }
}
