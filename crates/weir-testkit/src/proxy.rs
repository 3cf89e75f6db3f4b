//! A TCP proxy between weir and PostgreSQL that a test can make misbehave.
//!
//! ```text
//! weir ──► 127.0.0.1:proxy.port() ──► upstream (a private cluster's port)
//!            burst: what the server sends is held and delivered in one write per period
//!                   (every connection, or only replication connections)
//!            cut:   every open connection is closed at once (new ones are accepted)
//! ```
//!
//! Bursts put a whole large replication message in the client's socket before it reads any
//! of it, the case in which a reader that reads part and then waits for the next wake-up
//! stalls. Cuts are connections that break under a running process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the proxy forwards what the server sends.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// As it arrives.
    Pass,
    /// Held, then delivered in one write every period.
    Burst(Duration),
    /// `Burst` on connections whose startup message asks for replication (seen only when the
    /// client does not use TLS); others as they arrive.
    BurstReplication(Duration),
}

/// A running proxy; stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    cuts: watch::Sender<u64>,
    accept: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16, mode: Mode) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cuts, _) = watch::channel(0u64);
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let cuts = cuts.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        continue;
                    };
                    let cut = cuts.subscribe();
                    let task = tokio::spawn(forward(client, server, mode, cut));
                    let mut open = connections.lock().unwrap();
                    open.retain(|t| !t.is_finished());
                    open.push(task);
                }
            })
        };
        Ok(Self { port, cuts, accept, connections })
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `url` with its port replaced by the proxy's (`postgres://u@127.0.0.1:5432/db`).
    pub fn url(&self, url: &str) -> String {
        let (head, tail) = url.rsplit_once('/').expect("a URL with a database");
        let host = head.rsplit_once(':').map_or(head, |(h, _)| h);
        format!("{host}:{}/{tail}", self.port)
    }

    /// Closes every open connection.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn forward(client: TcpStream, server: TcpStream, mode: Mode, mut cut: watch::Receiver<u64>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (period, replication_only) = match mode {
        Mode::Pass => (None, false),
        Mode::Burst(period) => (Some(period), false),
        Mode::BurstReplication(period) => (Some(period), true),
    };
    let replication = AtomicBool::new(false);
    let up = async {
        let mut buf = vec![0u8; 1 << 16];
        let mut seen = 0usize;
        loop {
            let Ok(n) = client_read.read(&mut buf).await else { return };
            if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
            // The startup message comes first; `replication` is one of its keys.
            if seen < 4096 && buf[..n].windows(11).any(|w| w == b"replication") {
                replication.store(true, Ordering::Relaxed);
            }
            seen += n;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let Ok(n) = server_read.read(&mut buf).await else { return };
            if n == 0 {
                return;
            }
            let mut held = buf[..n].to_vec();
            let burst = period.filter(|_| !replication_only || replication.load(Ordering::Relaxed));
            if let Some(period) = burst {
                // Let the rest of the period's bytes arrive, then hand all of them over in
                // one write.
                let until = tokio::time::Instant::now() + period;
                while let Ok(Ok(n)) =
                    tokio::time::timeout_at(until, server_read.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    held.extend_from_slice(&buf[..n]);
                }
            }
            if client_write.write_all(&held).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}
