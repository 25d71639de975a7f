//! rustls configs from files: the server side (certificate, key, optional client CA
//! and CRLs for mTLS) and the client side (CA or the system trust store, optional
//! client certificate). Errors name the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A TLS setup problem, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material.
    #[error("TLS setup: {0}")]
    Rustls(String),
}

fn file_err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The crypto provider used everywhere (ring), with AES-128-GCM preferred over
/// AES-256-GCM: both gateways are ours, and at the same security level for a session
/// key it does 10 AES rounds per block instead of 14, the largest single cost of bulk
/// transfer (BENCHMARKS.md). ChaCha20-Poly1305 stays last; peers choose among all three.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    });
    Arc::new(p)
}

/// Reads a credential file. With `owner` (Unix), only a file that belongs to that uid: a
/// local caller's `{user}` credentials, which must be the caller's own, not a file the
/// gateway can read and the caller cannot (a symlink in the caller's directory to
/// another user's key, or to a root-owned one, say). The owner is checked on the opened
/// file, so a path swapped after the check reads nothing else; and such a file must be
/// a regular file of at most [`MAX_CALLER_FILE_BYTES`] (opened without waiting: a FIFO
/// or a terminal of the caller's would hold a thread, a huge file the memory).
pub fn read_credential(path: &Path, owner: Option<u32>) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    #[cfg(unix)]
    if let Some(want) = owner {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)?;
        let m = f.metadata()?;
        let refuse = |why: String| {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                why,
            ))
        };
        if m.uid() != want {
            return refuse(format!(
                "the file belongs to uid {}, not to the local caller (uid {want})",
                m.uid()
            ));
        }
        if !m.is_file() || m.len() > MAX_CALLER_FILE_BYTES {
            return refuse(format!(
                "not a regular file of at most {MAX_CALLER_FILE_BYTES} bytes"
            ));
        }
        let mut bytes = Vec::new();
        f.take(MAX_CALLER_FILE_BYTES).read_to_end(&mut bytes)?;
        return Ok(bytes);
    }
    #[cfg(not(unix))]
    let _ = owner;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The largest credential file a local caller's `{user}` path may name.
pub const MAX_CALLER_FILE_BYTES: u64 = 1 << 20;

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_owned_by(path, None)
}

/// Reads a PEM certificate chain, from a file of `owner` if given ([`read_credential`]).
fn certs_owned_by(
    path: &Path,
    owner: Option<u32>,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_credential(path, owner)
        .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_owned_by(path, None)
}

fn key_owned_by(path: &Path, owner: Option<u32>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_credential(path, owner)
        .map_err(|e| file_err(path, format!("cannot read a private key: {e}")))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_err(path, format!("cannot read a private key: {e}")))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    roots_owned_by(path, None)
}

fn roots_owned_by(path: &Path, owner: Option<u32>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_owned_by(path, owner)? {
        roots
            .add(c)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A gateway's TLS setup: its server config, and the verifier of client certificates
/// inside it (`None` without a client CA), to check a certificate again later.
pub struct ServerTls {
    /// The server config.
    pub config: Arc<ServerConfig>,
    /// Its client-certificate verifier.
    pub client_verifier: Option<ClientVerifier>,
}

/// A client-certificate verifier, and a digest of the client CA certificates and CRLs
/// it was built from (two verifiers with the same digest accept the same certificates).
#[derive(Clone)]
pub struct ClientVerifier {
    /// The verifier.
    pub verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// The digest.
    pub digest: [u8; 32],
}

/// Adds `field` to `h`, length first, so that a sequence of fields has one reading.
pub(crate) fn hash_field(h: &mut sha2::Sha256, field: &[u8]) {
    use sha2::Digest;
    h.update((field.len() as u64).to_le_bytes());
    h.update(field);
}

/// Server config: `client_ca` enables client certificates, mandatory unless
/// `tokens_configured` (then optional at the TLS layer; a presented one is still verified).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    crls: &[PathBuf],
    tokens_configured: bool,
) -> Result<ServerTls, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let verifier = match client_ca {
        Some(ca) => Some(client_verifier(ca, crls, tokens_configured)?),
        None => None,
    };
    let builder = match &verifier {
        Some(v) => builder.with_client_cert_verifier(v.verifier.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| file_err(key, format!("key does not fit the certificate: {e}")))?;
    // h2 lets clients run many sessions over one connection (RFC 8441).
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption makes repeat connections from the same forward cheap.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(ServerTls {
        config: Arc::new(cfg),
        client_verifier: verifier,
    })
}

/// What client certificates are checked against: they must chain to `ca` and not be
/// revoked by `crls`; with `tokens_configured`, a client may also present none.
fn client_verifier(
    ca: &Path,
    crls: &[PathBuf],
    tokens_configured: bool,
) -> Result<ClientVerifier, TlsError> {
    use sha2::{Digest, Sha256};
    let roots = Arc::new(load_roots(ca)?);
    let mut crl_ders = Vec::new();
    for p in crls {
        let list = CertificateRevocationListDer::pem_file_iter(p)
            .map_err(|e| file_err(p, format!("cannot read CRL: {e}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(p, format!("bad CRL PEM: {e}")))?;
        crl_ders.extend(list);
    }
    // What webpki takes from a trust anchor, then each CRL, counted.
    let mut h = Sha256::new();
    hash_field(&mut h, &(roots.roots.len() as u64).to_le_bytes());
    for root in roots.roots.iter() {
        hash_field(&mut h, root.subject.as_ref());
        hash_field(&mut h, root.subject_public_key_info.as_ref());
        hash_field(&mut h, root.name_constraints.as_deref().unwrap_or_default());
    }
    for crl in &crl_ders {
        hash_field(&mut h, crl.as_ref());
    }
    let mut vb = WebPkiClientVerifier::builder_with_provider(roots, provider()).with_crls(crl_ders);
    if tokens_configured {
        vb = vb.allow_unauthenticated();
    }
    Ok(ClientVerifier {
        verifier: vb.build().map_err(|e| TlsError::Rustls(e.to_string()))?,
        digest: h.finalize().into(),
    })
}

/// Server-side TLS session cache size (resumption for repeat clients).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// A credential file and the uid it must belong to, if any ([`read_credential`]).
pub type OwnedFile<'a> = (&'a Path, Option<u32>);

/// Client config: trust `ca` (or the system trust store) and present `cert`/`key` if given.
pub fn client_config(
    ca: Option<OwnedFile<'_>>,
    cert_key: Option<(OwnedFile<'_>, OwnedFile<'_>)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some((p, owner)) => roots_owned_by(p, owner)?,
        None => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots);
    let mut cfg = match cert_key {
        Some(((c, c_owner), (k, k_owner))) => builder
            .with_client_auth_cert(certs_owned_by(c, c_owner)?, key_owned_by(k, k_owner)?)
            .map_err(|e| file_err(k, format!("key does not fit the certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

pub use crate::platform::set_keepalive;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn a_callers_file_must_be_its_own_regular_file_and_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = rustix::process::geteuid().as_raw();
        let own = dir.path().join("own.pem");
        std::fs::write(&own, b"pem").expect("write");
        assert_eq!(read_credential(&own, Some(me)).expect("own file"), b"pem");
        let other = read_credential(&own, Some(me + 1)).expect_err("someone else's");
        assert!(
            other.to_string().contains("not to the local caller"),
            "{other}"
        );
        // A FIFO (no writer: a plain open would wait for ever) and a huge file.
        let fifo = dir.path().join("fifo.pem");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let e = read_credential(&fifo, Some(me)).expect_err("a FIFO");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big.pem");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(MAX_CALLER_FILE_BYTES + 1))
            .expect("big file");
        assert!(
            read_credential(&big, Some(me)).is_err(),
            "a file over the limit"
        );
        // Without an owner, nothing of this is asked.
        assert!(read_credential(&big, None).is_ok());
    }

    /// Moves what `from` has to send into `to`, and lets `to` process it.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
        }
        to.process_new_packets().unwrap();
    }

    /// Drives a handshake between `client` and `server` in memory; returns the suite.
    fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> rustls::CipherSuite {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut c: rustls::Connection = rustls::ClientConnection::new(client, name).unwrap().into();
        let mut s: rustls::Connection = rustls::ServerConnection::new(server).unwrap().into();
        for _ in 0..20 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            pump(&mut c, &mut s);
            pump(&mut s, &mut c);
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake stuck"
        );
        let cs = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(s.negotiated_cipher_suite().unwrap().suite(), cs);
        cs
    }

    #[test]
    fn gateways_agree_on_aes_128_gcm_and_still_accept_the_others() {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::ensure_dev_pki(dir.path()).unwrap();
        let p = |n: &str| dir.path().join(n);
        let server = server_config(
            &p("server.pem"),
            &p("server.key"),
            Some(&p("ca.pem")),
            &[],
            false,
        )
        .unwrap()
        .config;
        let client = client_config(
            Some((&p("ca.pem"), None)),
            Some(((&p("dev.pem"), None), (&p("dev.key"), None))),
        )
        .unwrap();
        assert_eq!(
            handshake(client.clone(), server.clone()),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // A peer that offers only AES-256-GCM or ChaCha20 still gets it (the server
        // follows the client's order among the suites both have).
        for only in [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let mut prov = (*provider()).clone();
            prov.cipher_suites.retain(|s| s.suite() == only);
            let roots = load_roots(&p("ca.pem")).unwrap();
            let narrow = ClientConfig::builder_with_provider(Arc::new(prov))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    load_certs(&p("dev.pem")).unwrap(),
                    load_key(&p("dev.key")).unwrap(),
                )
                .unwrap();
            assert_eq!(handshake(Arc::new(narrow), server.clone()), only);
        }
    }
}
