//! The replication connection's transport: one libpq connection in COPY BOTH mode, driven
//! on tokio's reactor. The only `unsafe` in weir, and the only code that touches libpq.
//!
//! ```text
//! stream.rs ── connect / start / read / send ──► Connection ── FFI ──► libpq ──► PostgreSQL
//! ```
//!
//! libpq keeps what every PostgreSQL client expects of a connection string: `PG*` variables,
//! `.pgpass`, service files, multiple hosts, `connect_timeout`, `sslmode` and certificates.
//! Everything above this module is safe Rust and knows nothing of libpq.
//!
//! Why our own: the binding we used before cleared the socket's readiness whenever libpq had
//! no whole message yet. libpq reads at most its buffer's free space in one call, so part of
//! a large message could stay in the socket (or, under TLS, decrypted inside OpenSSL); with
//! tokio's edge-triggered readiness no new wake-up came until the server sent something else,
//! and weir sends status updates often enough that the server never needs to send a
//! keepalive. A lone 200 kB row then waited for the next change. [`Connection::read`] clears
//! readiness only when neither the socket nor the TLS layer holds anything unread
//! (`crates/weir/tests/ingest.rs`, `a_lone_large_row_reaches_the_log_at_once`).
//!
//! Safety rules, kept by every function here: the `PGconn` is owned by one [`Connection`] and
//! used only through `&mut self` (so never from two threads at once); every `PGresult` and
//! every buffer libpq hands out is freed before the function returns; the socket is
//! deregistered from the reactor before `PQfinish` closes it.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

use bytes::Bytes;
use pq_sys::{ConnStatusType, ExecStatusType, PGconn, PGresult};
use tokio::io::unix::AsyncFd;

/// What libpq or the server said went wrong.
#[derive(Debug, Clone)]
pub(crate) struct PqError {
    /// The server's SQLSTATE, when the server answered with an error.
    pub sqlstate: Option<String>,
    /// libpq's or the server's words.
    pub message: String,
    /// The connection could not be opened at all (no SQLSTATE is available then).
    pub connecting: bool,
}

impl PqError {
    fn local(message: impl Into<String>) -> Self {
        Self { sqlstate: None, message: message.into(), connecting: false }
    }
}

impl std::fmt::Display for PqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sqlstate {
            Some(code) => write!(f, "[{code}] {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The connection's socket, as the reactor sees it. libpq owns and closes it.
#[derive(Debug)]
struct Socket(RawFd);

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One libpq connection, opened in non-blocking mode.
pub(crate) struct Connection {
    conn: NonNull<PGconn>,
    /// `None` only while dropping.
    socket: Option<AsyncFd<Socket>>,
}

// SAFETY: libpq allows a connection to move between threads as long as one thread at a time
// uses it; `Connection` owns the `PGconn` and every use goes through `&mut self`.
unsafe impl Send for Connection {}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("socket", &self.socket).finish()
    }
}

/// A `PGconn` on its way out of `spawn_blocking`.
struct Opened(*mut PGconn);
// SAFETY: nothing uses the pointer until `Connection::connect` takes it back on one thread.
unsafe impl Send for Opened {}

impl Connection {
    /// Opens a connection with `conninfo` (a URL or `key=value` pairs). libpq's own connect
    /// (`PQconnectdb`) runs on a blocking thread, so every libpq connection option behaves as
    /// it does in `psql`.
    pub(crate) async fn connect(conninfo: &str) -> Result<Self, PqError> {
        let info = CString::new(conninfo)
            .map_err(|_| PqError::local("the connection string contains a NUL byte"))?;
        let opened = tokio::task::spawn_blocking(move || {
            // SAFETY: `info` is a valid C string that outlives the call.
            Opened(unsafe { pq_sys::PQconnectdb(info.as_ptr()) })
        })
        .await
        .map_err(|e| PqError::local(format!("the connecting thread failed: {e}")))?;
        let conn = NonNull::new(opened.0)
            .ok_or_else(|| PqError::local("libpq could not allocate a connection"))?;
        // From here on `Drop` finishes the connection whatever happens.
        let mut this = Self { conn, socket: None };
        // SAFETY: `conn` is a live connection owned by `this`.
        let status = unsafe { pq_sys::PQstatus(this.conn.as_ptr()) };
        if status != ConnStatusType::CONNECTION_OK {
            return Err(PqError { connecting: true, ..this.error("could not connect") });
        }
        // SAFETY: as above.
        if unsafe { pq_sys::PQsetnonblocking(this.conn.as_ptr(), 1) } != 0 {
            return Err(this.error("could not switch the connection to non-blocking mode"));
        }
        // SAFETY: as above.
        let fd = unsafe { pq_sys::PQsocket(this.conn.as_ptr()) };
        if fd < 0 {
            return Err(this.error("the connection has no socket"));
        }
        // SAFETY: `fd` is the open socket of `conn`, which stays open until `Drop` has
        // deregistered it; libpq does not replace a connected socket.
        let socket = unsafe { AsyncFd::register(Socket(fd)) }
            .map_err(|e| PqError::local(format!("could not watch the connection's socket: {e}")))?;
        this.socket = Some(socket);
        Ok(this)
    }

    /// The server's version as a number (150004 for 15.4).
    pub(crate) fn server_version(&self) -> i32 {
        // SAFETY: `conn` is live for as long as `self`.
        unsafe { pq_sys::PQserverVersion(self.conn.as_ptr()) }
    }

    /// Sends `sql` (a `START_REPLICATION` command) and waits until the server has entered
    /// COPY BOTH mode, or returns the server's error.
    pub(crate) async fn start_copy_both(&mut self, sql: &str) -> Result<(), PqError> {
        let query =
            CString::new(sql).map_err(|_| PqError::local("the command contains a NUL byte"))?;
        // SAFETY: `conn` is live; `query` is a valid C string that outlives the call.
        if unsafe { pq_sys::PQsendQuery(self.conn.as_ptr(), query.as_ptr()) } != 1 {
            return Err(self.error("could not send the command"));
        }
        self.flush().await?;
        loop {
            // SAFETY: `conn` is live.
            if unsafe { pq_sys::PQisBusy(self.conn.as_ptr()) } == 0 {
                // SAFETY: `conn` is live; the result is freed by `Result` below.
                let result = Result_(unsafe { pq_sys::PQgetResult(self.conn.as_ptr()) });
                if result.0.is_null() {
                    return Err(PqError::local("the server answered the command with nothing"));
                }
                // SAFETY: `result` holds a non-null result.
                let status = unsafe { pq_sys::PQresultStatus(result.0) };
                if status == ExecStatusType::PGRES_COPY_BOTH {
                    return Ok(());
                }
                // The connection is dropped after this; PQfinish frees what is left.
                return Err(result.error());
            }
            self.wait_readable().await?;
        }
    }

    /// The next CopyData message's bytes. Cancel-safe: whatever arrived stays buffered in
    /// libpq for the next call.
    pub(crate) async fn read(&mut self) -> Result<Bytes, PqError> {
        loop {
            if let Some(bytes) = self.buffered()? {
                return Ok(bytes);
            }
            self.wait_readable().await?;
        }
    }

    /// The next CopyData message if libpq holds a whole one (it never reads the socket here).
    fn buffered(&mut self) -> Result<Option<Bytes>, PqError> {
        let mut buffer: *mut c_char = std::ptr::null_mut();
        // SAFETY: `conn` is live; in async mode libpq never blocks, and it hands us a buffer
        // we free below.
        let n = unsafe { pq_sys::PQgetCopyData(self.conn.as_ptr(), &mut buffer, 1) };
        match n {
            0 => Ok(None),
            -1 => Err(self.copy_ended()),
            n if n < 0 => Err(self.error("the replication stream broke")),
            n => {
                // SAFETY: libpq returned `n` bytes at `buffer`, which we own until freed.
                let bytes = unsafe {
                    let bytes = std::slice::from_raw_parts(buffer.cast::<u8>(), n as usize);
                    let copy = Bytes::copy_from_slice(bytes);
                    pq_sys::PQfreemem(buffer.cast::<c_void>());
                    copy
                };
                Ok(Some(bytes))
            }
        }
    }

    /// Queues `data` as one CopyData message and sends it.
    pub(crate) async fn send(&mut self, data: &[u8]) -> Result<(), PqError> {
        let len = c_int::try_from(data.len())
            .map_err(|_| PqError::local("a message to the server is too large"))?;
        loop {
            // SAFETY: `conn` is live; libpq copies `len` bytes from `data`.
            match unsafe { pq_sys::PQputCopyData(self.conn.as_ptr(), data.as_ptr().cast(), len) } {
                1 => break,
                // Non-blocking mode and libpq's output buffer is full: send some, then retry.
                0 => self.flush().await?,
                _ => return Err(self.error("could not send to the server")),
            }
        }
        self.flush().await
    }

    /// Sends everything libpq has queued.
    async fn flush(&mut self) -> Result<(), PqError> {
        loop {
            // SAFETY: `conn` is live.
            match unsafe { pq_sys::PQflush(self.conn.as_ptr()) } {
                0 => return Ok(()),
                1 => {}
                _ => return Err(self.error("could not send to the server")),
            }
            // libpq's documentation: while a flush waits, read what the server sends, or
            // both sides may wait on each other.
            let socket = self.socket()?;
            tokio::select! {
                ready = socket.writable() => {
                    let mut guard = ready.map_err(watch_failed)?;
                    // The next PQflush tries again; the readiness is cleared for it only if
                    // no new wake-up came since this one.
                    guard.clear_ready();
                }
                ready = socket.readable() => {
                    let guard = ready.map_err(watch_failed)?;
                    self.consume(guard)?;
                }
            }
        }
    }

    /// Waits until the socket is readable and moves what it holds into libpq's buffer.
    async fn wait_readable(&mut self) -> Result<(), PqError> {
        let guard = self.socket()?.readable().await.map_err(watch_failed)?;
        self.consume(guard)
    }

    /// `PQconsumeInput`, then clears the readiness only if nothing is left unread.
    ///
    /// One `PQconsumeInput` reads at most libpq's free buffer space, which is smaller than a
    /// large message. The reactor's readiness is edge-triggered: cleared while bytes remain
    /// in the socket or in OpenSSL, no wake-up would come for them until the server sent
    /// something new. So readiness is kept (and the caller reads again at once) while either
    /// holds bytes.
    fn consume(
        &self,
        mut guard: tokio::io::unix::AsyncFdReadyGuard<'_, Socket>,
    ) -> Result<(), PqError> {
        // SAFETY: `conn` is live.
        if unsafe { pq_sys::PQconsumeInput(self.conn.as_ptr()) } == 0 {
            return Err(self.error("the connection to the server broke"));
        }
        if !self.unread_in_socket(guard.get_ref().get_ref().0) && !self.unread_in_tls() {
            guard.clear_ready();
        }
        Ok(())
    }

    /// Whether the socket holds bytes not yet read (or has been closed, which the next
    /// `PQconsumeInput` reports).
    fn unread_in_socket(&self, fd: RawFd) -> bool {
        let mut byte = 0u8;
        // SAFETY: `fd` is the connection's open socket; `recv` writes at most one byte into
        // `byte` and, with MSG_PEEK, leaves it in the socket for libpq.
        let n = unsafe {
            libc::recv(fd, (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        n != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
    }

    /// Whether OpenSSL holds decrypted bytes libpq has not taken yet.
    fn unread_in_tls(&self) -> bool {
        // SAFETY: `conn` is live.
        if unsafe { pq_sys::PQsslInUse(self.conn.as_ptr()) } == 0 {
            return false;
        }
        let Some(pending) = ssl_pending() else { return false };
        // SAFETY: `conn` is live; the name is a valid C string.
        let ssl = unsafe { pq_sys::PQsslStruct(self.conn.as_ptr(), c"OpenSSL".as_ptr()) };
        // SAFETY: `ssl` is the connection's live `SSL *`, which `SSL_pending` only reads.
        !ssl.is_null() && unsafe { pending(ssl) } > 0
    }

    /// The server ended the COPY: its error, or that it ended without one.
    fn copy_ended(&mut self) -> PqError {
        // An error ends the COPY with the whole message already buffered; a plain CopyDone
        // may not have its CommandComplete yet, and PQgetResult would block for it.
        // SAFETY: `conn` is live.
        let busy = unsafe {
            pq_sys::PQconsumeInput(self.conn.as_ptr());
            pq_sys::PQisBusy(self.conn.as_ptr()) != 0
        };
        if !busy {
            // SAFETY: `conn` is live; the result is freed by `Result_`.
            let result = Result_(unsafe { pq_sys::PQgetResult(self.conn.as_ptr()) });
            // SAFETY: `result` is checked non-null first.
            if !result.0.is_null()
                && unsafe { pq_sys::PQresultStatus(result.0) } == ExecStatusType::PGRES_FATAL_ERROR
            {
                return result.error();
            }
        }
        PqError::local("the server ended the replication stream")
    }

    fn socket(&self) -> Result<&AsyncFd<Socket>, PqError> {
        self.socket.as_ref().ok_or_else(|| PqError::local("the connection is closed"))
    }

    /// `context`, with libpq's last error message.
    fn error(&self, context: &str) -> PqError {
        // SAFETY: `conn` is live; the message is a C string owned by the connection.
        let message = unsafe { CStr::from_ptr(pq_sys::PQerrorMessage(self.conn.as_ptr())) };
        let message = message.to_string_lossy();
        let message = message.trim();
        PqError::local(if message.is_empty() {
            context.to_string()
        } else {
            format!("{context}: {message}")
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Deregister the socket before libpq closes it.
        drop(self.socket.take());
        // SAFETY: `conn` is live and nothing uses it after this.
        unsafe { pq_sys::PQfinish(self.conn.as_ptr()) }
    }
}

/// A `PGresult`, freed on drop.
struct Result_(*mut PGresult);

impl Result_ {
    /// The error this result carries, with the server's SQLSTATE.
    fn error(&self) -> PqError {
        // SAFETY: `self.0` is a live, non-null result; the strings are owned by it and
        // copied before it is freed.
        let (sqlstate, message) = unsafe {
            let code = pq_sys::PQresultErrorField(self.0, c_int::from(pq_sys::PG_DIAG_SQLSTATE));
            let code =
                (!code.is_null()).then(|| CStr::from_ptr(code).to_string_lossy().into_owned());
            let message = CStr::from_ptr(pq_sys::PQresultErrorMessage(self.0));
            (code, message.to_string_lossy().trim().to_string())
        };
        PqError { sqlstate, message, connecting: false }
    }
}

impl Drop for Result_ {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a result libpq returned, freed once.
            unsafe { pq_sys::PQclear(self.0) }
        }
    }
}

type SslPending = unsafe extern "C" fn(*mut c_void) -> c_int;

/// OpenSSL's `SSL_pending`, from the libssl that libpq itself loaded (none when libpq was
/// built without OpenSSL; then it never reports TLS in use either).
fn ssl_pending() -> Option<SslPending> {
    static PENDING: OnceLock<Option<SslPending>> = OnceLock::new();
    *PENDING.get_or_init(|| {
        // SAFETY: looking up a symbol in the loaded objects; the name is a valid C string.
        let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"SSL_pending".as_ptr()) };
        // SAFETY: `SSL_pending` has this signature: `int SSL_pending(const SSL *ssl)`.
        (!symbol.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut c_void, SslPending>(symbol) })
    })
}

fn watch_failed(e: std::io::Error) -> PqError {
    PqError::local(format!("could not wait on the connection's socket: {e}"))
}
