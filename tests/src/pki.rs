//! Test certificates made at test time (rcgen): a CA, and certificates it signs for
//! `localhost` and `127.0.0.1`, written as PEM files in a directory removed on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use relaymesh_net::tls::{Connector, TlsConfig};

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

/// A test CA and the directory its files live in.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM), to trust.
    pub ca: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish()
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Pki {
    /// A new CA named `name`, in a fresh directory.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "relaymesh-pki-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        Self {
            dir,
            issuer: Issuer::new(params, key),
            ca,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), usable by servers and as a client
    /// certificate, written as `<file>.pem` and `<file>.key`.
    pub fn issue_for(&self, file: &str, names: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, file.to_owned());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = Issued {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }

    /// A certificate for `localhost` and `127.0.0.1`.
    pub fn issue(&self, file: &str) -> Issued {
        self.issue_for(file, &["localhost", "127.0.0.1"])
    }

    /// A service's `[tls]` with a fresh certificate for `localhost` and `127.0.0.1`, trusting
    /// this CA, files looked at every 50 ms.
    pub fn service(&self, mtls: bool) -> TlsConfig {
        let issued = self.issue(&format!("service-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        TlsConfig {
            cert: Some(issued.cert),
            key: Some(issued.key),
            ca: Some(self.ca.clone()),
            mtls,
            reload_ms: 50,
        }
    }

    /// A dialer trusting this CA.
    pub fn connector(&self) -> Connector {
        Connector::new(Some(&self.ca), None).unwrap()
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
