//! Throw-away certificates made with the `openssl` CLI: a CA, a second CA that signed nothing
//! here (for "wrong CA" cases), and a server certificate the first one signed. P-256 keys,
//! valid for two days.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{TempDir, bins};

pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    /// A server certificate for `common_name` with the subjectAltName entries `sans`
    /// (`"DNS:db.test"`, `"IP:127.0.0.2"`).
    pub fn new(common_name: &str, sans: &[&str]) -> TestCa {
        let dir = TempDir::new("certs");
        let d = dir.path();
        std::fs::write(
            d.join("ext.cnf"),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )
        .expect("write ext.cnf");
        for name in ["ca", "other-ca"] {
            new_key(
                d,
                &format!("{name}.key"),
                &[
                    "-x509",
                    "-out",
                    &format!("{name}.crt"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=latch test {name}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        }
        new_key(
            d,
            "server.key",
            &["-out", "server.csr", "-subj", &format!("/CN={common_name}")],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        TestCa { dir }
    }

    /// The CA certificate (PEM) that signed the server certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A CA certificate that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.crt")
    }

    /// The server certificate (PEM).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// The server's private key (PEM, PKCS#8).
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// A client certificate for `common_name` (extendedKeyUsage clientAuth) signed by the CA:
    /// (certificate, key) PEM files.
    pub fn client_cert(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        std::fs::write(
            d.join("client-ext.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .expect("write client-ext.cnf");
        new_key(
            d,
            "client.key",
            &["-out", "client.csr", "-subj", &format!("/CN={common_name}")],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "client.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "client.crt",
                "-days",
                "2",
                "-extfile",
                "client-ext.cnf",
            ],
        );
        (d.join("client.crt"), d.join("client.key"))
    }
}

impl TestCa {
    /// A client certificate with subject `/CN=<common_name>` that the CA signed (TLS client
    /// authentication): the paths of its certificate and key (PEM).
    pub fn client(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let (cert, key, csr, ext) = (
            format!("client-{common_name}.crt"),
            format!("client-{common_name}.key"),
            format!("client-{common_name}.csr"),
            "client-ext.cnf",
        );
        std::fs::write(
            d.join(ext),
            "basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=clientAuth
",
        )
        .expect("write client-ext.cnf");
        new_key(
            d,
            &key,
            &["-out", &csr, "-subj", &format!("/CN={common_name}")],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
        (d.join(cert), d.join(key))
    }
}

/// `openssl req` with a fresh P-256 key written to `key_file`, plus `args`.
fn new_key(dir: &Path, key_file: &str, args: &[&str]) {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key_file,
    ];
    all.extend_from_slice(args);
    openssl(dir, &all);
}

fn openssl(dir: &Path, args: &[&str]) {
    crate::run_ok(
        Command::new(bins::tool("openssl", "openssl"))
            .current_dir(dir)
            .args(args),
    );
}
