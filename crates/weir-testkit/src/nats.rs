//! A private NATS server with JetStream, for the NATS sink's tests: `nats-server -js` on a free
//! port of 127.0.0.1 with its store in a temporary directory.
//!
//! ```text
//! NatsServer::reserve() ─ a free port and a store directory, nothing listening yet
//!   start() ─► nats-server -js -a 127.0.0.1 -p PORT -sd STORE ─► ready when the port accepts
//!   kill() (SIGKILL) / stop() (SIGTERM) ─► start() again: same port, same store (the streams
//!   and their duplicate windows survive)
//!   drop ─► SIGKILL; a watchdog kills it too if the test process dies first
//! ```
//!
//! The binary: `WEIR_NATS_SERVER`, then `/usr/sbin/nats-server`, then `nats-server` on `PATH`.

use std::fmt;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result, free_port, io};

/// A private `nats-server -js`; killed when dropped.
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    store: tempfile::TempDir,
    server: Option<Child>,
    watchdog: Option<Child>,
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("port", &self.port)
            .field("store", &self.store.path())
            .field("running", &self.server.is_some())
            .finish()
    }
}

impl NatsServer {
    /// Starts one on a free port.
    pub fn start() -> Result<Self> {
        let mut server = Self::reserve()?;
        server.start_again()?;
        Ok(server)
    }

    /// A free port and a store directory, with nothing listening yet (a server that is down);
    /// [`start_again`](Self::start_again) starts it there.
    pub fn reserve() -> Result<Self> {
        let bin = find_nats_server()?;
        let store = tempfile::Builder::new()
            .prefix("weir-nats-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        Ok(Self { bin, port: free_port()?, store, server: None, watchdog: None })
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts it (again) on its port with its store; returns once it accepts connections.
    pub fn start_again(&mut self) -> Result<()> {
        assert!(self.server.is_none(), "the NATS server is already running");
        let log = self.store.path().join("nats.log");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path().join("js"))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(io(format!("spawning {}", self.bin.display())))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            let exited = child.try_wait().map_err(io("waiting for nats-server"))?;
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().map_err(io("waiting for nats-server"))?;
                return Err(Error::Command {
                    command: format!("{cmd:?}"),
                    status: status.to_string(),
                    output: tail(&log),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.watchdog = Some(watchdog(child.id())?);
        self.server = Some(child);
        Ok(())
    }

    /// Kills it (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.stop_watchdog();
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (SIGTERM: it shuts down cleanly) and waits until it has exited.
    pub fn stop(&mut self) {
        self.stop_watchdog();
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        tail(&self.store.path().join("nats.log"))
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A shell that kills the server when this process dies (even by SIGKILL) before it does.
fn watchdog(server: u32) -> Result<Child> {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {server} 2>/dev/null; do sleep 0.5; done; \
         kill -9 {server} 2>/dev/null"
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("spawning the NATS server watchdog"))
}

/// Finds `nats-server`; the error says how to install it.
pub fn find_nats_server() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEIR_NATS_SERVER").map(PathBuf::from) {
        return if p.is_file() { Ok(p) } else { Err(Error::NoNatsServer) };
    }
    let sbin = Path::new("/usr/sbin/nats-server");
    if sbin.is_file() {
        return Ok(sbin.to_path_buf());
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or(Error::NoNatsServer)
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
