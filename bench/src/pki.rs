//! Certificates for `--tls`, made at start with rcgen: a CA, and one certificate it signs for
//! `localhost` and `127.0.0.1` (usable by servers and as a client certificate), written as PEM
//! in a fresh private temporary directory that is removed when the run ends. Every server
//! presents that certificate; every client trusts the CA.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files the servers and clients are given.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    /// The CA certificate, which clients (and servers dialing each other) trust.
    pub(crate) ca: PathBuf,
    /// The servers' certificate, for `localhost` and `127.0.0.1`.
    pub(crate) cert: PathBuf,
    /// Its private key (PKCS#8).
    pub(crate) key: PathBuf,
}

/// The certificates of one run and the directory holding them, removed on drop.
#[derive(Debug)]
pub(crate) struct Pki {
    dir: PathBuf,
    files: TlsFiles,
}

impl Pki {
    /// Makes the CA and the server certificate in a new directory under the system's
    /// temporary directory.
    pub(crate) fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "relaymesh-bench-tls-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // From here on, drop removes the directory whatever fails next.
        let pki = Self {
            files: TlsFiles {
                ca: dir.join("ca.pem"),
                cert: dir.join("server.pem"),
                key: dir.join("server.key"),
            },
            dir,
        };
        pki.issue()?;
        Ok(pki)
    }

    fn issue(&self) -> anyhow::Result<()> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "relaymesh bench CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        leaf.distinguished_name
            .push(DnType::CommonName, "relaymesh bench server");
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = leaf.signed_by(&key, &issuer)?;

        write(&self.files.ca, ca_cert.pem().as_bytes(), 0o644)?;
        write(&self.files.cert, cert.pem().as_bytes(), 0o644)?;
        write(&self.files.key, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(())
    }

    /// The files to hand to servers and clients.
    pub(crate) fn files(&self) -> &TlsFiles {
        &self.files
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a new file with the given permissions.
fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_made_and_removed_with_the_directory() {
        let pki = Pki::create().expect("certificates");
        let files = pki.files().clone();
        let certs = relaymesh_net::tls::read_certificates(&files.cert).expect("server cert");
        assert!(relaymesh_net::tls::names_host(&certs[0], "127.0.0.1"));
        assert!(relaymesh_net::tls::names_host(&certs[0], "localhost"));
        relaymesh_net::tls::Identity::load(&files.cert, &files.key).expect("key fits cert");
        relaymesh_net::tls::Connector::new(Some(&files.ca), None).expect("CA loads");
        drop(pki);
        assert!(!files.ca.exists() && !files.key.exists());
    }
}
