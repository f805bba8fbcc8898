//! The node-local CA: TLS toward applications (a policy's `appTls`) presents a certificate for
//! the destination the application asked for, issued on the fly by a CA that exists only on
//! this node. Applications that verify (`sslmode=verify-full`) trust it through the PEM that
//! `latch ca export` prints; the rest (`require`, `prefer`) work unchanged.
//!
//! The CA is an ECDSA P-256 key and a self-signed certificate in `<state dir>/ca/`
//! (`ca.key`, mode 0600, in a 0700 directory; `ca.crt`), created on first use under an
//! exclusive lock so concurrent agents agree on one. Leaf certificates (ECDSA P-256, seven days,
//! the destination's address and, for host policies, its name) are kept in memory per
//! destination and re-issued a day before they expire. Leaf keys never leave the process.
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write as _,
    net::IpAddr,
    os::fd::AsRawFd as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
};
use zeroize::Zeroizing;

/// Where latch keeps state when nothing says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/latch";
/// Environment variable that overrides [`DEFAULT_STATE_DIR`] (tests point it at a temp dir).
pub const STATE_DIR_ENV: &str = "LATCH_STATE_DIR";

const CA_COMMON_NAME: &str = "latch node-local CA";
const CA_ORGANIZATION: &str = "latch";
/// A year: the CA is rotated (`latch ca rotate`) well within that.
const CA_VALIDITY_DAYS: i64 = 365;
const LEAF_VALIDITY_DAYS: i64 = 7;
/// Leaves are re-issued when less than this remains.
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// Destinations whose leaf configurations are kept; past it the cache starts over.
const MAX_LEAVES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA key {} is readable by group or others (mode {mode:o}); it must be 0600", path.display())]
    InsecureKey { path: PathBuf, mode: u32 },
    #[error(
        "CA directory {} must belong to uid {want} and be closed to others (0700); it is uid \
         {uid}, mode {mode:o}", path.display()
    )]
    InsecureDir {
        path: PathBuf,
        uid: u32,
        want: u32,
        mode: u32,
    },
    #[error("{what}: {reason}")]
    Crypto { what: &'static str, reason: String },
}

fn crypto(what: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |e| CaError::Crypto {
        what,
        reason: e.to_string(),
    }
}

static STATE_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the state directory for this process (the command line's `--state-dir`); call before
/// the broker starts. Later calls are ignored.
pub fn set_state_dir(dir: PathBuf) {
    let _ = STATE_DIR.set(dir);
}

/// The state directory: as set by [`set_state_dir`], else `$LATCH_STATE_DIR`, else
/// [`DEFAULT_STATE_DIR`].
pub fn state_dir() -> PathBuf {
    if let Some(dir) = STATE_DIR.get() {
        return dir.clone();
    }
    std::env::var_os(STATE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
}

/// A loaded CA: its certificate and the key that signs leaves.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// The CA's subject and extensions; the same each time, so a loaded key issues leaves that
/// chain to the stored certificate.
fn ca_params() -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(crypto("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating system random source");
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// Loads the CA from `<state_dir>/ca/`, creating it there first if it does not exist.
    pub fn load_or_create(state_dir: &Path) -> Result<Ca, CaError> {
        Ca::under_lock(state_dir, false)
    }

    /// Replaces the CA with a new key and certificate; the old certificate is kept as
    /// `ca.previous.crt` so that [`Ca::trust_bundle`] still includes it while applications move
    /// to the new one. Agents use the new CA from their next start.
    pub fn rotate(state_dir: &Path) -> Result<Ca, CaError> {
        Ca::under_lock(state_dir, true)
    }

    /// The certificates applications should trust: this CA's and, after a rotation, the
    /// previous one's.
    pub fn trust_bundle(state_dir: &Path) -> Result<String, CaError> {
        let ca = Ca::load_or_create(state_dir)?;
        let previous = state_dir.join("ca").join("ca.previous.crt");
        let mut bundle = ca.cert_pem().to_owned();
        if let Ok(old) = std::fs::read_to_string(&previous) {
            bundle.push_str(&old);
        }
        Ok(bundle)
    }

    fn under_lock(state_dir: &Path, rotate: bool) -> Result<Ca, CaError> {
        let dir = state_dir.join("ca");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| CaError::Io {
                what: "creating the CA directory",
                path: dir.clone(),
                source,
            })?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| CaError::Io {
                what: "opening",
                path: lock_path.clone(),
                source,
            })?;
        // SAFETY: flock(2) on a descriptor this function owns; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CaError::Io {
                what: "locking",
                path: lock_path,
                source: std::io::Error::last_os_error(),
            });
        }
        check_dir(&dir)?;
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        let ca = if rotate && key_path.exists() {
            let previous = dir.join("ca.previous.crt");
            std::fs::rename(&cert_path, &previous).map_err(|source| CaError::Io {
                what: "keeping the previous certificate as",
                path: previous,
                source,
            })?;
            Ca::create(&key_path, &cert_path)
        } else if key_path.exists() {
            Ca::load(&key_path, &cert_path)
        } else {
            Ca::create(&key_path, &cert_path)
        };
        drop(lock);
        ca
    }

    fn load(key_path: &Path, cert_path: &Path) -> Result<Ca, CaError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { what, path, source }
        };
        let meta = std::fs::metadata(key_path).map_err(io("reading", key_path))?;
        if meta.mode() & 0o077 != 0 {
            return Err(CaError::InsecureKey {
                path: key_path.to_path_buf(),
                mode: meta.mode() & 0o7777,
            });
        }
        let key_pem =
            Zeroizing::new(std::fs::read_to_string(key_path).map_err(io("reading", key_path))?);
        let key = KeyPair::from_pem(&key_pem).map_err(crypto("the CA key"))?;
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io("reading", cert_path))?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| CaError::Crypto {
                what: "the CA certificate",
                reason: format!("{} holds no PEM certificate", cert_path.display()),
            })?;
        Ok(Ca {
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    fn create(key_path: &Path, cert_path: &Path) -> Result<Ca, CaError> {
        let key = KeyPair::generate().map_err(crypto("generating the CA key"))?;
        let mut params = ca_params()?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(crypto("signing the CA certificate"))?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        write_new(cert_path, cert.pem().as_bytes(), 0o644)?;
        write_new(key_path, key_pem.as_bytes(), 0o600)?;
        tracing::info!(cert = %cert_path.display(), "created the node-local CA");
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server configuration presenting a new leaf for `ip` (and `host`), the CA after it.
    pub fn issue(&self, ip: IpAddr, host: Option<&str>) -> Result<Arc<ServerConfig>, CaError> {
        let (chain, key_der) = self.issue_leaf(ip, host)?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| CaError::Crypto {
                    what: "TLS versions",
                    reason: e.to_string(),
                })?
                .with_no_client_auth()
                .with_single_cert(chain, key_der)
                .map_err(|e| CaError::Crypto {
                    what: "the leaf certificate",
                    reason: e.to_string(),
                })?;
        Ok(Arc::new(config))
    }

    /// A new leaf for `ip` and, when given, `host`: the chain (leaf, CA) and the leaf's key.
    fn issue_leaf(
        &self,
        ip: IpAddr,
        host: Option<&str>,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate().map_err(crypto("generating a leaf key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(crypto("leaf parameters"))?;
        let mut sans = vec![SanType::IpAddress(ip)];
        let cn = match host {
            Some(h) => {
                sans.insert(
                    0,
                    SanType::DnsName(h.to_owned().try_into().map_err(crypto("leaf name"))?),
                );
                h.to_owned()
            }
            None => ip.to_string(),
        };
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(crypto("signing a leaf certificate"))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![leaf.der().clone(), self.cert_der.clone()], key_der))
    }
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
/// The CA directory must be the agent's alone: whoever can write it can put a CA of their own
/// in front of every application that trusts latch's.
fn check_dir(dir: &Path) -> Result<(), CaError> {
    let meta = std::fs::metadata(dir).map_err(|source| CaError::Io {
        what: "reading",
        path: dir.to_path_buf(),
        source,
    })?;
    let want = nix::unistd::geteuid().as_raw();
    if meta.uid() != want || meta.mode() & 0o077 != 0 {
        return Err(CaError::InsecureDir {
            path: dir.to_path_buf(),
            uid: meta.uid(),
            want,
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path); // a certificate left by an interrupted creation
    let mut f: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Server configurations by destination (address, policy host), with when to re-issue.
type LeafCache = HashMap<(IpAddr, Option<String>), (Arc<ServerConfig>, Instant)>;

/// The CA as the broker uses it: loaded (or created) on first need from the state directory,
/// leaf configurations cached per destination.
pub struct NodeCa {
    state_dir: PathBuf,
    ca: Mutex<Option<Arc<Ca>>>,
    leaves: Mutex<LeafCache>,
}

impl Default for NodeCa {
    fn default() -> Self {
        NodeCa::new(state_dir())
    }
}

impl NodeCa {
    pub fn new(state_dir: PathBuf) -> NodeCa {
        NodeCa {
            state_dir,
            ca: Mutex::new(None),
            leaves: Mutex::new(HashMap::new()),
        }
    }

    /// The CA, loading or creating it on first use (retried on the next use after a failure).
    pub fn ca(&self) -> Result<Arc<Ca>, CaError> {
        let mut slot = self.ca.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ca) = slot.as_ref() {
            return Ok(ca.clone());
        }
        let ca = Arc::new(Ca::load_or_create(&self.state_dir)?);
        *slot = Some(ca.clone());
        Ok(ca)
    }

    /// A server configuration presenting a leaf for `ip` (and `host`), from the cache or new.
    pub fn server_config(
        &self,
        ip: IpAddr,
        host: Option<&str>,
    ) -> Result<Arc<ServerConfig>, CaError> {
        let key = (ip, host.map(str::to_owned));
        let now = Instant::now();
        {
            let leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((config, renew_at)) = leaves.get(&key)
                && *renew_at > now
            {
                return Ok(config.clone());
            }
        }
        let config = self.ca()?.issue(ip, host)?;
        let renew_at =
            now + Duration::from_secs(LEAF_VALIDITY_DAYS as u64 * 86_400) - LEAF_RENEW_BEFORE;
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(key, (config.clone(), renew_at));
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_loads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ca::load_or_create(dir.path()).unwrap();
        let key = dir.path().join("ca/ca.key");
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("ca")).unwrap().mode() & 0o777,
            0o700
        );
        let b = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert!(a.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn rotation_makes_a_new_ca_and_keeps_the_old_certificate_in_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let old = Ca::load_or_create(dir.path()).unwrap();
        let new = Ca::rotate(dir.path()).unwrap();
        assert_ne!(old.cert_pem(), new.cert_pem());
        assert_eq!(
            Ca::load_or_create(dir.path()).unwrap().cert_pem(),
            new.cert_pem()
        );
        let bundle = Ca::trust_bundle(dir.path()).unwrap();
        assert!(bundle.starts_with(new.cert_pem()), "{bundle}");
        assert!(bundle.ends_with(old.cert_pem()), "{bundle}");
    }

    #[test]
    fn refuses_a_ca_directory_others_may_enter() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let ca_dir = dir.path().join("ca");
        std::fs::set_permissions(&ca_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = Ca::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("closed to others (0700)") && e.contains("mode 755"),
            "{e}"
        );
    }

    #[test]
    fn refuses_a_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let key = dir.path().join("ca/ca.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let e = Ca::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("must be 0600"), "{e}");
    }

    /// A leaf issued by a reloaded CA verifies against the stored certificate, for its address
    /// and its name.
    #[test]
    fn leaves_chain_to_the_stored_certificate() {
        use rustls::{
            RootCertStore,
            client::WebPkiServerVerifier,
            client::danger::ServerCertVerifier,
            pki_types::{ServerName, UnixTime},
        };
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let nca = NodeCa::new(dir.path().to_path_buf());
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let config = nca.server_config(ip, Some("orders-db.internal")).unwrap();
        assert!(Arc::ptr_eq(
            &config,
            &nca.server_config(ip, Some("orders-db.internal")).unwrap()
        ));
        let ca = nca.ca().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let (chain, _) = ca.issue_leaf(ip, Some("orders-db.internal")).unwrap();
        for name in [
            ServerName::try_from("orders-db.internal").unwrap(),
            ServerName::IpAddress(ip.into()),
        ] {
            verifier
                .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
                .unwrap();
        }
        let other = ServerName::try_from("elsewhere.internal").unwrap();
        assert!(
            verifier
                .verify_server_cert(&chain[0], &chain[1..], &other, &[], UnixTime::now())
                .is_err()
        );
    }
}
