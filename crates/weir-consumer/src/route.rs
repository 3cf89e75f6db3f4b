//! Which lane a key goes to: a stable hash, the same in every process and every version, so
//! a key's events always meet in one lane (and so the lane count of a consumer is fixed).

use std::hash::{Hash, Hasher};

/// A key's lane: `fnv1a(key) % lanes`.
pub(crate) fn route(key: &str, lanes: i32) -> i32 {
    // FNV-1a: stable across processes and versions (std's hasher is not).
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    key.hash(&mut h);
    (h.finish() % lanes.max(1) as u64) as i32
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_spreads() {
        assert_eq!(route("{\"id\":1}", 8), route("{\"id\":1}", 8));
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            seen.insert(route(&format!("{{\"id\":{i}}}"), 8));
        }
        assert_eq!(seen.len(), 8);
        assert_eq!(route("anything", 1), 0);
    }
}
