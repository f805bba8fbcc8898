//! A string that holds a secret: zeroized on drop, never printed.

use std::fmt;

use zeroize::Zeroizing;

/// A secret value. Its memory is wiped when dropped; `Debug` prints `<redacted>`; there is no
/// `Display`. Read it with [`SecretString::expose`] only where the bytes are needed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: String) -> SecretString {
        SecretString(Zeroizing::new(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
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
