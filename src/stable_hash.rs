//! A stable 64-bit hash (FNV-1a): the same on every node and every build,
//! unlike std's hasher. Whatever several nodes must pick alike hashes with
//! it: a tenant's queue and a stream's id on the bus, a user's owner node,
//! the users a canary serves.

/// The FNV-1a hash of `bytes`.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
