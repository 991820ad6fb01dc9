//! The end-to-end harness: starts real processes on free loopback ports and tears them down.
//!
//! Each test builds its own little world — [`nats::NatsServer`] (JetStream on, own store
//! directory), [`standin::StandIn`] (the NoETL stand-in binary), [`origin::Origin`] (the
//! origin binary) — so tests run in parallel without sharing a port or a bucket. Every
//! process is killed when its guard drops; if the test is panicking, the last lines of each
//! process's log are printed so the failure explains itself. [`demo::DemoService`] (the
//! `demo-service` binary) is the backend behind `/api/v1/<name>/*`. [`metrics`] parses the
//! origin's `/metrics` exposition for the suites that read it.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod demo;
pub mod edge;
pub mod flows;
pub mod metrics;
pub mod nats;
pub mod origin;
pub mod sse;
pub mod standin;

/// A free TCP port on 127.0.0.1 (asked of the kernel, then released for the child to
/// bind). Never the same port twice in one test process; another process may still take
/// it before the child binds — [`listener_owned_by`] tells, and the starters retry.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("the kernel always has a free ephemeral port on loopback");
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
}

/// True if a TCP listener on `port` (any local address) is held by a process of `pids`.
///
/// A server started on a port from [`free_port`] can lose it to another process, and a
/// health check on that port then passes against the wrong server; this tells the two
/// apart (Linux: `/proc/net/tcp*` inodes against `/proc/<pid>/fd`).
pub fn listener_owned_by(port: u16, pids: &[u32]) -> bool {
    let inodes = listening_inodes(port);
    !inodes.is_empty()
        && pids.iter().any(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|fds| {
                    fds.flatten().any(|fd| {
                        std::fs::read_link(fd.path())
                            .ok()
                            .and_then(|l| {
                                l.to_str()
                                    .and_then(|l| l.strip_prefix("socket:["))
                                    .and_then(|l| l.strip_suffix(']'))
                                    .map(str::to_owned)
                            })
                            .is_some_and(|inode| inodes.contains(&inode))
                    })
                })
                .unwrap_or(false)
        })
}

/// Inodes of LISTEN sockets on `port` (any local address).
fn listening_inodes(port: u16) -> Vec<String> {
    let port_hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let listening = cols.get(3) == Some(&"0A");
                    let on_port = cols.get(1).is_some_and(|a| a.ends_with(&port_hex));
                    (listening && on_port).then(|| cols.get(9).map(|i| (*i).to_owned()))?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The repository root (the workspace).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf()
}

/// Where `scripts/setup.sh` installs tools (`$GATEWAY_TOOLS`, default `~/.cache/noetl-gateway`).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("GATEWAY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/noetl-gateway")
        })
}

/// The path of a workspace binary (`origin`, `noetl-standin`) built in the same profile
/// as the running test: `$GATEWAY_BIN_DIR/<name>`, or the test executable's
/// `target/<profile>/` directory. `make test` builds all binaries before running tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("GATEWAY_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("a running program knows its own path");
    // Tests run from target/<profile>/deps/, binaries (benchmarks) from target/<profile>/.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} is missing next to {}: build the workspace binaries first (`cargo build --workspace --bins`, which `make test` does)",
                exe.display()
            )
        })
}

/// A child process that is killed (SIGTERM, then SIGKILL after 3 s) when dropped.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> std::io::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        // If the test process dies without running this guard's Drop (a harness timeout
        // kills it with SIGKILL), the kernel sends the child SIGTERM: no server outlives
        // its test. Set between fork and exec; the flag survives exec.
        // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The log file the process writes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends a signal (e.g. `"TERM"`, `"KILL"`, `"STOP"`, `"CONT"`).
    /// Does nothing once the process has been reaped: `kill` with pid 0 would signal the
    /// test's own process group.
    pub fn signal(&self, sig: &str) {
        match self.pid() {
            0 => {}
            pid => self.signal_pid(pid, sig),
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL if it has not exited within `grace`.
    /// Returns the exit status if it exited.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        self.signal_pid(child.id(), "TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits up to `timeout` for the process to exit by itself (no signal sent) and reaps
    /// it; its exit status, or `None` if it is still running.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal_pid(&self, pid: u32, sig: &str) {
        assert_ne!(pid, 0, "pid 0 would signal the test's own process group");
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status();
    }

    fn print_log_tail(&self) {
        let Ok(f) = std::fs::File::open(&self.log) else {
            return;
        };
        let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
        let start = lines.len().saturating_sub(60);
        eprintln!(
            "----- last lines of {} ({}) -----",
            self.name,
            self.log.display()
        );
        for l in &lines[start..] {
            eprintln!("{l}");
        }
        eprintln!("----- end of {} -----", self.name);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tail();
        }
        self.stop(Duration::from_secs(3));
    }
}

/// Polls `url` until it answers 2xx or `timeout` passes.
pub async fn wait_until_ok(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + timeout;
    loop {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if Instant::now() >= deadline => {
                anyhow::bail!("{url} still answers {} after {timeout:?}", r.status())
            }
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("{url} not reachable after {timeout:?}: {e}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The workspace binary `bin` with an empty environment but `PATH`, `HOME` and
/// `RUST_LOG` (from the variable `log_var`, `info` when unset): what a test child starts
/// from, so nothing of the test's environment leaks into it by accident.
pub fn clean_command(bin: &str, log_var: &str) -> Command {
    let mut cmd = Command::new(workspace_bin(bin));
    cmd.env_clear().env(
        "RUST_LOG",
        std::env::var(log_var).unwrap_or_else(|_| "info".into()),
    );
    for keep in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd
}

/// A child serving HTTP on one port of its own: what [`spawn_on_free_port`] started.
pub struct Served {
    /// The port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The child, stopped when dropped.
    pub guard: ChildGuard,
}

/// Starts the binary `name` on a [`free_port`] (`command` makes its command line for a
/// port; output to `log`) and waits for `health` (a path) to answer 2xx. Another process
/// may take the port first, and the health check would then pass against it: only a
/// listener the child owns counts ([`listener_owned_by`]); up to three ports are tried,
/// then the error carries the child's log.
pub async fn spawn_on_free_port(
    name: &str,
    log: PathBuf,
    health: &str,
    mut command: impl FnMut(u16) -> Command,
) -> anyhow::Result<Served> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port();
        let mut guard = ChildGuard::spawn(name, command(port), log.clone())?;
        let url = format!("http://127.0.0.1:{port}");
        let up = wait_until_ok(&format!("{url}{health}"), Duration::from_secs(30)).await;
        if up.is_ok() && listener_owned_by(port, &[guard.pid()]) {
            return Ok(Served { port, url, guard });
        }
        guard.stop(Duration::from_secs(2));
        if attempt >= 3 {
            anyhow::bail!(
                "{name} did not start on its own port: {up:?}\n{}",
                guard.log_text()
            );
        }
    }
}

/// Polls `check` every 50 ms until it is true; panics naming `what` after `timeout`.
/// What a test waits on instead of a fixed sleep: the condition, with a deadline.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` every `every` until it is true, and returns how long that took; panics
/// naming `what` after `timeout`. For a delay a test measures ("refused within 1 s"): the
/// finer the poll, the closer the figure is to the moment the condition came true (mind
/// rate limits when polling through the edge).
pub async fn time_until<F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "not within {timeout:?}: {what}");
        tokio::time::sleep(every).await;
    }
    start.elapsed()
}

/// A scratch directory for one test's logs and data, removed when dropped unless
/// `GATEWAY_KEEP_TEST_DIRS` is set.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if std::env::var_os("GATEWAY_KEEP_TEST_DIRS").is_some() {
        b.disable_cleanup(true);
    }
    b.tempdir().expect("the temp directory is writable")
}

/// Whether `buf` starts with one whole HTTP/1.1 response framed by `content-length` (none:
/// an empty body): its status and the body's byte range in `buf`; `None` while more bytes
/// are needed or the head is not a status line. For clients that read kept-alive
/// connections by hand (connection tests, bench-abuse).
pub fn complete_response(buf: &[u8]) -> Option<(u16, std::ops::Range<usize>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let body = end + 4..end + 4 + len;
    (buf.len() >= body.end).then_some((status, body))
}

/// Sends `request` (a complete HTTP/1.1 request, sent byte for byte, so paths are not
/// normalised the way URL libraries do) to `base_url`'s host and port, and returns the
/// status and body. Used for traversal tests, where `%2e%2e` must reach the server as is.
pub async fn raw_http(base_url: &str, request: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = base_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&authority).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
