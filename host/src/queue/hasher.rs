//! Routing keys to workers. A [`WorkerHasher`] maps a key to a worker lane; a
//! negative answer drops the key (the controller counts the drop). The default,
//! [`Fnv1a`], is FNV-1a of the key modulo the worker count, as in reference 000,
//! so one key always lands on the same worker.

/// Maps a key to a worker lane in `0..count`, or a negative number to drop it.
pub trait WorkerHasher: Send + Sync {
    fn route(&self, key: &str, count: usize) -> i64;
}

/// FNV-1a (32-bit) of the key, modulo the worker count.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fnv1a;

impl Fnv1a {
    /// The 32-bit FNV-1a hash of `bytes`.
    pub fn hash(bytes: &[u8]) -> u32 {
        bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        })
    }
}

impl WorkerHasher for Fnv1a {
    fn route(&self, key: &str, count: usize) -> i64 {
        if count <= 1 {
            return 0;
        }
        i64::from(Self::hash(key.as_bytes()) % count as u32)
    }
}

impl<F: Fn(&str, usize) -> i64 + Send + Sync> WorkerHasher for F {
    fn route(&self, key: &str, count: usize) -> i64 {
        self(key, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // Test vectors from the FNV reference (draft-eastlake-fnv).
        assert_eq!(Fnv1a::hash(b""), 0x811c9dc5);
        assert_eq!(Fnv1a::hash(b"a"), 0xe40c292c);
        assert_eq!(Fnv1a::hash(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn fnv1a_routes_a_key_to_the_same_worker_and_spreads_keys() {
        let mut seen = [0usize; 4];
        for i in 0..1000 {
            let key = format!("File:ns/{i}");
            let lane = Fnv1a.route(&key, 4);
            assert_eq!(lane, Fnv1a.route(&key, 4));
            seen[lane as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(Fnv1a.route("anything", 1), 0);
    }
}
