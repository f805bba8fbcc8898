//! A string that holds a secret: kept out of swap where possible, zeroized on drop, never
//! printed.

use std::fmt;

use zeroize::Zeroize as _;

use super::mlock::LockedBuf;

/// A secret value. Its bytes live in locked memory ([`super::mlock`]: out of swap and core dumps,
/// best effort, a failure is counted in [`super::mlock::stats`]) and are wiped when it is dropped;
/// the `String` it is made from is wiped at once. `Debug` prints `<redacted>`; there is no
/// `Display`. Read it with [`SecretString::expose`] only where the bytes are needed.
pub struct SecretString(LockedBuf);

impl SecretString {
    pub fn new(mut value: String) -> SecretString {
        let locked = LockedBuf::copy_of(value.as_bytes());
        value.zeroize();
        SecretString(locked)
    }

    pub fn expose(&self) -> &str {
        // SAFETY: the bytes were copied from a `String` and are never changed.
        unsafe { std::str::from_utf8_unchecked(self.0.as_bytes()) }
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl Eq for SecretString {}

impl Clone for SecretString {
    fn clone(&self) -> Self {
        SecretString(LockedBuf::copy_of(self.0.as_bytes()))
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> SecretString {
        SecretString::new(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::mlock;

    #[test]
    fn debug_is_redacted() {
        let s = SecretString::new("hunter2".to_string());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
    }

    /// The bytes are in locked memory while the secret lives and not once it is dropped;
    /// clones have their own.
    #[test]
    fn buffer_is_locked_while_alive() {
        let before = mlock::stats();
        let s = SecretString::new("s3cret".repeat(20));
        let clone = s.clone();
        let (p1, p2) = (s.expose().as_ptr(), clone.expose().as_ptr());
        let after = mlock::stats();
        // Locking may fail (RLIMIT_MEMLOCK), but every attempt is counted one way or the other.
        assert!((after.locked + after.failed) - (before.locked + before.failed) >= 2);
        if mlock::is_locked(p1) {
            assert!(mlock::is_locked(p2), "the clone's buffer is not locked");
        } else {
            assert!(after.failed > before.failed);
        }
        // Dropped, the bytes are wiped (the memory stays mapped for reuse; another test's
        // secret may have taken the slot since, but never holds this value).
        let gone = |p: *const u8| {
            // SAFETY: slots stay mapped for the life of the process.
            let now = unsafe { std::slice::from_raw_parts(p, 120) };
            !now.windows(6).any(|w| w == b"s3cret")
        };
        drop(s);
        assert!(gone(p1), "the secret's bytes stayed after drop");
        drop(clone);
        assert!(gone(p2), "the clone's bytes stayed after drop");
    }

    #[test]
    fn empty_secrets_lock_nothing() {
        let s = SecretString::new(String::new());
        assert!(!mlock::is_locked(s.expose().as_ptr()));
        drop(s);
    }
}
