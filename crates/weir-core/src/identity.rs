//! The one name a running weir gives itself in the database: `host:pid:tag`.
//!
//! It appears wherever a row says who holds something — the slot's lease
//! (`weir.source_state.holder`), consumer lanes (`weir.checkpoints.owner`,
//! `weir.consumer_nodes`), running jobs (`weir.jobs.attempted_by`) — so `weir status` shows one
//! format, and one `weir run` shows the same name in all of them. The host and pid say where
//! to look; the random tag keeps two instances apart when pids repeat (containers, where every
//! process may be pid 1) or when one process runs two engines (tests do).

use std::fmt;

/// A process's identity in the database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessId(String);

impl ProcessId {
    /// A new identity for this process: host name, pid and a random tag of 8 hex digits.
    pub fn generate() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let tag: u32 = {
            // No dependency for 32 random bits: the std hasher is seeded randomly per process,
            // and the clock separates two identities made in one process.
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            h.finish() as u32
        };
        Self(format!("{host}:{}:{tag:08x}", std::process::id()))
    }

    /// An identity given by name (tests, or an operator who wants a fixed one).
    pub fn named(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The identity as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_pid_tag_and_distinct() {
        let a = ProcessId::generate();
        let b = ProcessId::generate();
        assert_ne!(a, b);
        let parts: Vec<&str> = a.as_str().rsplitn(3, ':').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(parts[0].len(), 8);
        assert_eq!(parts[1], std::process::id().to_string());
    }
}
