//! What latch answers an application's request for TLS (PostgreSQL's SSLRequest, MySQL's
//! CLIENT_SSL in the greeting): the policy's `appTls.mode` and the leg to the server decide it,
//! before the application asks (sans-IO).
//!
//! The rule behind `auto`, the default: an application that verifies latch's certificate
//! (libpq `verify-full` with the node CA as its root) concludes that it talks, encrypted, to
//! the server it named. Latch can stand behind that only when it verifies the server's
//! certificate and name itself (`tls.mode: verify-full`, the default). With a plain, `prefer`,
//! `require` or `verify-ca` leg it declines ('N'), as a server without SSL does: an application
//! that asked for TLS learns the truth (libpq `require` fails with "server does not support
//! SSL", `prefer` goes on in plain text). The SSLRequest is the same whatever the application
//! will check afterwards, so the answer must hold for the application that checks the most.
//! `enable` is the operator saying otherwise (the loader warns when the server leg is not
//! `verify-full`).
use super::{AppTlsMode, Policy, TlsMode};
use crate::connector::registry;

/// The answer to an SSLRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslAnswer {
    /// 'S', then a TLS handshake with a certificate from the node-local CA.
    Tls,
    /// 'N': the application goes on in plain text or gives up.
    Decline,
}

/// The answer for `mode` when the leg to the server is `server_leg` and, with `direct`, the
/// application's own connection carries the session.
pub fn ssl_answer(mode: AppTlsMode, server_leg: TlsMode, direct: bool) -> SslAnswer {
    if direct {
        // The application's own plain connection goes to the server (`direct` needs
        // `tls.mode: disable`, and refuses `enable` at load).
        return SslAnswer::Decline;
    }
    match (mode, server_leg) {
        (AppTlsMode::Enable, _) | (AppTlsMode::Auto, TlsMode::VerifyFull) => SslAnswer::Tls,
        (AppTlsMode::Auto | AppTlsMode::Disable, _) => SslAnswer::Decline,
    }
}

impl Policy {
    /// What this policy answers an application's SSLRequest (see [`ssl_answer`]); always
    /// [`SslAnswer::Decline`] for protocols whose connector does not terminate TLS from
    /// applications ([`Support::app_tls`](crate::connector::registry::Support::app_tls)).
    pub fn ssl_answer(&self) -> SslAnswer {
        if !registry::supports(self.protocol).is_some_and(|s| s.app_tls) {
            return SslAnswer::Decline;
        }
        ssl_answer(self.app_tls, self.tls.mode, self.direct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_offers_tls_only_over_a_verified_server_leg() {
        use SslAnswer::{Decline as N, Tls as S};
        use TlsMode::*;
        // (appTls mode, tls.mode to the server, direct, answer)
        let table = [
            (AppTlsMode::Auto, VerifyFull, false, S),
            (AppTlsMode::Auto, VerifyCa, false, N),
            (AppTlsMode::Auto, Require, false, N),
            (AppTlsMode::Auto, Prefer, false, N),
            (AppTlsMode::Auto, Disable, false, N),
            (AppTlsMode::Auto, Disable, true, N),
            (AppTlsMode::Enable, VerifyFull, false, S),
            (AppTlsMode::Enable, Require, false, S),
            (AppTlsMode::Enable, Disable, false, S),
            (AppTlsMode::Disable, VerifyFull, false, N),
            (AppTlsMode::Disable, Disable, false, N),
            (AppTlsMode::Disable, Disable, true, N),
        ];
        for (mode, leg, direct, want) in table {
            assert_eq!(
                ssl_answer(mode, leg, direct),
                want,
                "appTls {mode:?}, tls.mode {leg}, direct {direct}"
            );
        }
        assert_eq!(AppTlsMode::default(), AppTlsMode::Auto);
    }
}
