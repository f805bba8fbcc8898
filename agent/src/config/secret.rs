//! A string that holds a secret: kept out of swap where possible, zeroized on drop, never
//! printed.

use std::fmt;

use zeroize::Zeroize as _;

use super::mlock;

/// A secret value. Its heap buffer is `mlock`ed (best effort: a failure is counted, see
/// [`mlock::stats`]), wiped and unlocked when dropped; `Debug` prints `<redacted>`; there is no
/// `Display`. Read it with [`SecretString::expose`] only where the bytes are needed.
#[derive(PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> SecretString {
        mlock::lock(value.as_ptr(), value.capacity());
        SecretString(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Clone for SecretString {
    fn clone(&self) -> Self {
        SecretString::new(self.0.clone())
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        let (ptr, cap) = (self.0.as_ptr(), self.0.capacity());
        // Wipes the whole capacity, then the pages may be swapped again.
        self.0.zeroize();
        mlock::unlock(ptr, cap);
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

    #[test]
    fn debug_is_redacted() {
        let s = SecretString::new("hunter2".to_string());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
    }

    /// The buffer is locked while the secret lives and released when it is dropped; clones
    /// lock their own buffer.
    #[test]
    fn buffer_is_locked_while_alive() {
        let before = mlock::stats();
        let s = SecretString::new("s3cret".repeat(2000));
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
        drop(s);
        assert!(!mlock::is_locked(p1));
        drop(clone);
        assert!(!mlock::is_locked(p2));
    }

    #[test]
    fn empty_secrets_lock_nothing() {
        let s = SecretString::new(String::new());
        assert!(!mlock::is_locked(s.expose().as_ptr()));
        drop(s);
    }
}
