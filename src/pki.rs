//! Local PKI helpers: generation of a small certificate authority with server and
//! client certificates (`pipebridge certs init` and the `tls.dev_pki` development
//! mode), plus bearer-token creation and hashing. Certificates use ECDSA P-256 keys,
//! private keys are written as PKCS#8 PEM files created with mode 0600, and existing
//! files are never overwritten unless explicitly forced.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

/// Common name of the generated certificate authority.
const CA_COMMON_NAME: &str = "pipebridge dev CA";
/// Seconds in one day.
const DAY_SECS: u64 = 24 * 60 * 60;
/// Certificates become valid this long before generation (clock-skew margin).
const BACKDATE_DAYS: u64 = 1;
/// Certificates expire this long after generation.
const VALIDITY_DAYS: u64 = 825;
/// Longest accepted client name (it becomes a file name and a CN).
const MAX_CLIENT_NAME_LEN: usize = 64;
/// Prefix of bearer tokens produced by [`new_token`].
const TOKEN_PREFIX: &str = "pbt_";
/// Number of random bytes in a bearer token.
const TOKEN_RANDOM_BYTES: usize = 32;
/// Client name used by the development PKI.
const DEV_CLIENT: &str = "dev";
/// Server name used by the development PKI.
const DEV_SERVER_NAME: &str = "localhost";
/// Names that are always added to the server certificate's SANs.
const DEFAULT_SERVER_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Options of `pipebridge certs init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertsInit {
    /// Directory the PEM files are written to (created with mode 0700 if missing).
    pub dir: PathBuf,
    /// DNS names or IP literals the server certificate is valid for; `localhost`,
    /// `127.0.0.1` and `::1` are always included.
    pub server_names: Vec<String>,
    /// Client names; each gets `NAME.pem` / `NAME.key` with CN = NAME.
    pub clients: Vec<String>,
    /// Overwrite existing files instead of refusing.
    pub force: bool,
}

/// Errors produced while generating or writing PKI material or tokens.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A target file already exists and `force` was not given.
    #[error("refusing to overwrite {} (use --force)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// Creating the output directory failed.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory that could not be created.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Inspecting a target file failed.
    #[error("cannot inspect {}: {source}", path.display())]
    Inspect {
        /// The file that could not be inspected.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Generating a key or certificate failed.
    #[error("cannot generate {}: {source}", path.display())]
    Generate {
        /// The file whose contents were being generated.
        path: PathBuf,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A client name is unusable as a certificate CN and file name.
    #[error("invalid client name {name:?}: {reason}")]
    InvalidClientName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A server name is neither an IP literal nor a valid DNS name.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidServerName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The system clock is before the Unix epoch.
    #[error("system clock is before 1970-01-01; cannot set certificate validity")]
    Clock,
    /// The operating system's random number generator failed.
    #[error("cannot read OS randomness: {0}")]
    Random(getrandom::Error),
}

/// One file to be written: name inside the directory, contents, and whether it is secret.
struct OutFile {
    /// File name inside the output directory.
    name: String,
    /// PEM contents.
    contents: String,
    /// Private keys are created with mode 0600.
    secret: bool,
}

/// Writes ca.pem ca.key server.pem server.key and NAME.pem NAME.key per client into
/// `dir` (created, mode 0700 if new). Keys get mode 0600 at creation time. Refuses to
/// overwrite any existing target file unless `force`; in that case nothing is written.
/// Returns the paths written, in the order listed above.
pub fn init(opts: &CertsInit) -> Result<Vec<PathBuf>, PkiError> {
    let clients = validate_clients(&opts.clients)?;
    let sans = server_sans(&opts.server_names)?;
    let server_cn = match opts.server_names.first() {
        Some(first) => san_display(&parse_server_name(first)?),
        None => DEFAULT_SERVER_SANS[0].to_owned(),
    };

    // An existing CA (ca.pem + ca.key) is reused without --force, so `certs init --dir D
    // --client bob` adds a client to a PKI; the server pair is then written only when it
    // is missing or server names are given.
    let ca_key_path = opts.dir.join("ca.key");
    let existing_ca = !opts.force && opts.dir.join("ca.pem").exists() && ca_key_path.exists();
    let ca_key = if existing_ca {
        let pem = std::fs::read_to_string(&ca_key_path).map_err(|source| PkiError::Inspect {
            path: ca_key_path.clone(),
            source,
        })?;
        Some(
            KeyPair::from_pem(&pem).map_err(|source| PkiError::Generate {
                path: ca_key_path.clone(),
                source,
            })?,
        )
    } else {
        None
    };
    let with_server =
        !existing_ca || !opts.server_names.is_empty() || !opts.dir.join("server.pem").exists();

    // Refuse early, before spending time on key generation.
    let targets = target_names(&clients, !existing_ca, with_server);
    if !opts.force {
        for name in &targets {
            check_absent(&opts.dir.join(name))?;
        }
    }

    let server = with_server.then_some((server_cn.as_str(), sans));
    let files = generate(&opts.dir, server, &clients, ca_key)?;

    create_dir(&opts.dir)?;
    if !opts.force {
        // Re-check: the directory may have changed while keys were generated.
        for file in &files {
            check_absent(&opts.dir.join(&file.name))?;
        }
    }
    let mut written = Vec::with_capacity(files.len());
    for file in &files {
        let path = opts.dir.join(&file.name);
        write_file(&path, file, opts.force)?;
        written.push(path);
    }
    Ok(written)
}

/// Whether the development PKI in `dir` is whole: [`ensure_dev_pki`] leaves it as it is
/// (otherwise it generates all of it again).
pub fn dev_pki_complete(dir: &Path) -> Result<bool, PkiError> {
    for name in ["ca.pem", "server.pem", "server.key", "dev.pem", "dev.key"] {
        let path = dir.join(name);
        match path.try_exists() {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(source) => return Err(PkiError::Inspect { path, source }),
        }
    }
    Ok(true)
}

/// Dev PKI for `tls.dev_pki`: if `dir`/ca.pem, server.pem, server.key, dev.pem and
/// dev.key all exist, does nothing and returns `Ok(false)`; otherwise generates them
/// (server name `localhost`, client `dev`) exactly like [`init`] with `force = true`
/// and returns `Ok(true)`.
pub fn ensure_dev_pki(dir: &Path) -> Result<bool, PkiError> {
    if dev_pki_complete(dir)? {
        return Ok(false);
    }
    init(&CertsInit {
        dir: dir.to_path_buf(),
        server_names: vec![DEV_SERVER_NAME.to_owned()],
        clients: vec![DEV_CLIENT.to_owned()],
        force: true,
    })?;
    Ok(true)
}

/// A new bearer token: 32 random bytes from the OS (via getrandom), encoded as
/// `"pbt_"` followed by 64 lowercase hex digits (256 bits of randomness).
pub fn new_token() -> Result<String, PkiError> {
    let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
    getrandom::fill(&mut bytes).map_err(PkiError::Random)?;
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 2 * TOKEN_RANDOM_BYTES);
    token.push_str(TOKEN_PREFIX);
    push_hex(&mut token, &bytes);
    Ok(token)
}

/// The SHA-256 digest of the token's UTF-8 bytes as 64 lowercase hex digits.
pub fn token_sha256_hex(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(2 * digest.len());
    push_hex(&mut out, &digest);
    out
}

/// Appends `bytes` to `out` as lowercase hex.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

/// File names written by [`init`], in order.
fn target_names(clients: &[String], ca: bool, server: bool) -> Vec<String> {
    let mut names = Vec::new();
    if ca {
        names.extend(["ca.pem".to_owned(), "ca.key".to_owned()]);
    }
    if server {
        names.extend(["server.pem".to_owned(), "server.key".to_owned()]);
    }
    for client in clients {
        names.push(format!("{client}.pem"));
        names.push(format!("{client}.key"));
    }
    names
}

/// Checks client names: usable as file names and CNs, not clashing with `ca`/`server`
/// and not duplicated (case-insensitively).
fn validate_clients(clients: &[String]) -> Result<Vec<String>, PkiError> {
    let mut seen: Vec<String> = Vec::with_capacity(clients.len());
    for name in clients {
        let invalid = |reason| PkiError::InvalidClientName {
            name: name.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if name.len() > MAX_CLIENT_NAME_LEN {
            return Err(invalid("must be at most 64 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(invalid(
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ));
        }
        if name.starts_with(['.', '-']) {
            return Err(invalid("must not start with '.' or '-'"));
        }
        let lower = name.to_ascii_lowercase();
        if lower == "ca" || lower == "server" {
            return Err(invalid("clashes with the CA or server files"));
        }
        if seen.contains(&lower) {
            return Err(invalid("given more than once"));
        }
        seen.push(lower);
    }
    Ok(clients.to_vec())
}

/// Parses one server name: an IP literal (IPv6 optionally in brackets) becomes an IP
/// SAN, anything else must be a valid DNS name (optionally with a leading `*.`).
fn parse_server_name(name: &str) -> Result<SanType, PkiError> {
    let invalid = |reason| PkiError::InvalidServerName {
        name: name.to_owned(),
        reason,
    };
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    let base = name.strip_prefix("*.").unwrap_or(name);
    if rustls_pki_types::DnsName::try_from(base).is_err() {
        return Err(invalid("not an IP address or a valid DNS name"));
    }
    let ia5 = rcgen::string::Ia5String::try_from(name)
        .map_err(|_| invalid("not an IP address or a valid DNS name"))?;
    Ok(SanType::DnsName(ia5))
}

/// Human-readable form of a SAN (used for the server CN).
fn san_display(san: &SanType) -> String {
    match san {
        SanType::IpAddress(ip) => ip.to_string(),
        SanType::DnsName(dns) => dns.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// Deduplication key of a SAN: IPs by value, DNS names case-insensitively.
fn san_key(san: &SanType) -> String {
    match san {
        SanType::IpAddress(ip) => format!("ip:{ip}"),
        SanType::DnsName(dns) => format!("dns:{}", dns.as_str().to_ascii_lowercase()),
        other => format!("other:{other:?}"),
    }
}

/// The server certificate's SANs: the given names, then the defaults, deduplicated.
fn server_sans(server_names: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    let mut keys = Vec::new();
    let all = server_names
        .iter()
        .map(String::as_str)
        .chain(DEFAULT_SERVER_SANS);
    for name in all {
        let san = parse_server_name(name)?;
        let key = san_key(&san);
        if !keys.contains(&key) {
            keys.push(key);
            sans.push(san);
        }
    }
    Ok(sans)
}

/// Parameters shared by all certificates: empty subject and a validity window from
/// now minus one day to now plus 825 days.
fn base_params() -> Result<CertificateParams, PkiError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::Clock)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = epoch + Duration::from_secs(now.as_secs());
    let mut params = CertificateParams::default();
    params.not_before = now - Duration::from_secs(BACKDATE_DAYS * DAY_SECS);
    params.not_after = now + Duration::from_secs(VALIDITY_DAYS * DAY_SECS);
    params.distinguished_name = DistinguishedName::new();
    Ok(params)
}

/// Generates all keys and certificates in memory; `dir` is only used for error messages.
fn generate(
    dir: &Path,
    server: Option<(&str, Vec<SanType>)>,
    clients: &[String],
    existing_ca_key: Option<KeyPair>,
) -> Result<Vec<OutFile>, PkiError> {
    let base = base_params()?;
    let gen_err = |name: &str| {
        let path = dir.join(name);
        move |source| PkiError::Generate { path, source }
    };

    // Certificate authority: the same subject and constraints whether new or reused, so
    // certificates signed with a reused key chain to the existing ca.pem.
    let mut ca_params = base.clone();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut files = Vec::new();
    let ca_key = match existing_ca_key {
        Some(k) => k,
        None => {
            let ca_key = KeyPair::generate().map_err(gen_err("ca.key"))?;
            let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err("ca.pem"))?;
            files.push(OutFile {
                name: "ca.pem".to_owned(),
                contents: ca_cert.pem(),
                secret: false,
            });
            files.push(OutFile {
                name: "ca.key".to_owned(),
                contents: ca_key.serialize_pem(),
                secret: true,
            });
            ca_key
        }
    };
    let issuer = Issuer::new(ca_params, &ca_key);

    // Leaf certificates: server first, then each client.
    let mut leaf = |stem: &str, cn: &str, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose| {
        let pem_name = format!("{stem}.pem");
        let key_name = format!("{stem}.key");
        let key = KeyPair::generate().map_err(gen_err(&key_name))?;
        let mut params = base.clone();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err(&pem_name))?;
        files.push(OutFile {
            name: pem_name,
            contents: cert.pem(),
            secret: false,
        });
        files.push(OutFile {
            name: key_name,
            contents: key.serialize_pem(),
            secret: true,
        });
        Ok::<(), PkiError>(())
    };
    if let Some((server_cn, server_sans)) = server {
        leaf(
            "server",
            server_cn,
            server_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
    }
    for client in clients {
        leaf(
            client,
            client,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
    }
    Ok(files)
}

/// Fails with [`PkiError::Exists`] if anything (even a dangling symlink) is at `path`.
fn check_absent(path: &Path) -> Result<(), PkiError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(PkiError::Exists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PkiError::Inspect {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates `dir` (and missing parents) with mode 0700 (on Windows it inherits the
/// parent's ACL); an existing directory is kept as is.
fn create_dir(dir: &Path) -> Result<(), PkiError> {
    let mut b = DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    b.mode(0o700);
    b.create(dir).map_err(|source| PkiError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Opens a new file exclusively (never following or reusing an existing entry),
/// with mode 0600 for secrets and 0644 otherwise (both subject to the umask).
fn create_new(path: &Path, secret: bool) -> io::Result<std::fs::File> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(if secret { 0o600 } else { 0o644 });
    #[cfg(windows)]
    let _ = secret;
    o.open(path)
}

/// Writes `contents` to a freshly created file and flushes it to disk.
fn write_new(path: &Path, file: &OutFile) -> io::Result<()> {
    let mut f = create_new(path, file.secret)?;
    f.write_all(file.contents.as_bytes())?;
    f.sync_all()
}

/// Writes one output file. Without `force` the file is created exclusively (an
/// existing entry yields [`PkiError::Exists`]); with `force` it is written to a
/// temporary file in the same directory and atomically renamed over the target, so
/// an existing file's permissions never leak onto a new key.
fn write_file(path: &Path, file: &OutFile, force: bool) -> Result<(), PkiError> {
    let write_err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    if !force {
        return match write_new(path, file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(PkiError::Exists {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(write_err(e)),
        };
    }
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(PkiError::Random)?;
    let mut tmp_name = format!(".{}.tmp-", file.name);
    push_hex(&mut tmp_name, &suffix);
    let tmp = path.with_file_name(tmp_name);
    let result = write_new(&tmp, file).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        // Best effort cleanup; the original error is what matters.
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

    fn opts(dir: &Path, force: bool) -> CertsInit {
        CertsInit {
            dir: dir.to_path_buf(),
            server_names: vec!["gw.example.com".to_owned(), "10.1.2.3".to_owned()],
            clients: vec!["alice".to_owned(), "bob".to_owned()],
            force,
        }
    }

    fn roots(dir: &Path) -> Arc<RootCertStore> {
        let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
        let mut store = RootCertStore::empty();
        store.add(ca).unwrap();
        Arc::new(store)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn verify_server(dir: &Path, name: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .unwrap();
        let cert = CertificateDer::from_pem_file(dir.join("server.pem")).unwrap();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&cert, &[], &server_name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn init_writes_all_files_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let written = init(&opts(&dir, false)).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca.key",
                "server.pem",
                "server.key",
                "alice.pem",
                "alice.key",
                "bob.pem",
                "bob.key"
            ]
        );
        assert_eq!(mode(&dir), 0o700);
        for path in &written {
            assert_eq!(path.parent().unwrap(), dir);
            assert!(path.is_file(), "{} missing", path.display());
            if path.extension().unwrap() == "key" {
                assert_eq!(mode(path), 0o600, "{}", path.display());
                let pem = std::fs::read_to_string(path).unwrap();
                assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
                assert!(matches!(
                    PrivateKeyDer::from_pem_file(path).unwrap(),
                    PrivateKeyDer::Pkcs8(_)
                ));
            }
        }
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), written.len());
    }

    #[test]
    fn refuses_overwrite_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let written = init(&opts(dir, false)).unwrap();
        let before: Vec<_> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();

        let err = init(&opts(dir, false)).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg == format!(
                "refusing to overwrite {} (use --force)",
                dir.join("server.pem").display()
            ),
            "{msg}"
        );
        let after: Vec<_> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();
        assert_eq!(before, after);

        // Any single existing target blocks the whole run, and nothing is written.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("bob.key"), b"keep").unwrap();
        let err = init(&opts(other.path(), false)).unwrap_err();
        assert!(err.to_string().contains("bob.key"), "{err}");
        assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 1);

        // With force everything is regenerated, keys still 0600.
        let forced = init(&opts(dir, true)).unwrap();
        assert_eq!(forced, written);
        let regenerated: Vec<_> = forced.iter().map(|p| std::fs::read(p).unwrap()).collect();
        assert_ne!(before, regenerated);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), written.len());

        // Forcing over a world-readable file does not keep its permissions.
        let loose = other.path().join("bob.key");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        init(&opts(other.path(), true)).unwrap();
        assert_eq!(mode(&loose), 0o600);
    }

    #[test]
    fn adds_a_client_to_an_existing_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&opts(dir, false)).unwrap();
        let ca_before = std::fs::read(dir.join("ca.pem")).unwrap();
        let server_before = std::fs::read(dir.join("server.pem")).unwrap();
        let added = init(&CertsInit {
            dir: dir.to_path_buf(),
            server_names: vec![],
            clients: vec!["carol".into()],
            force: false,
        })
        .unwrap();
        assert_eq!(added, vec![dir.join("carol.pem"), dir.join("carol.key")]);
        assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_before);
        assert_eq!(
            std::fs::read(dir.join("server.pem")).unwrap(),
            server_before
        );
        assert_eq!(mode(&dir.join("carol.key")), 0o600);
        // carol's certificate chains to the existing CA.
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
                .build()
                .unwrap();
        let cert = CertificateDer::from_pem_file(dir.join("carol.pem")).unwrap();
        verifier
            .verify_client_cert(&cert, &[], rustls_pki_types::UnixTime::now())
            .unwrap();
        // An existing client is still never overwritten.
        let again = init(&CertsInit {
            dir: dir.to_path_buf(),
            server_names: vec![],
            clients: vec!["carol".into()],
            force: false,
        });
        assert!(matches!(again, Err(PkiError::Exists { .. })));
    }

    #[test]
    fn server_cert_verifies_against_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&opts(dir, false)).unwrap();
        for name in [
            "localhost",
            "127.0.0.1",
            "::1",
            "gw.example.com",
            "10.1.2.3",
        ] {
            verify_server(dir, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify_server(dir, "other.example.com").is_err());

        let der = CertificateDer::from_pem_file(dir.join("server.pem")).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "gw.example.com");
    }

    #[test]
    fn server_cert_defaults_and_dedup() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let o = CertsInit {
            dir: dir.to_path_buf(),
            server_names: vec!["LOCALHOST".to_owned(), "[::1]".to_owned()],
            clients: Vec::new(),
            force: false,
        };
        assert_eq!(init(&o).unwrap().len(), 4);
        let der = CertificateDer::from_pem_file(dir.join("server.pem")).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 3, "{:?}", san.value);
        verify_server(dir, "127.0.0.1").unwrap();
    }

    #[test]
    fn client_cert_verifies_and_has_cn() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&opts(dir, false)).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .unwrap();
        for name in ["alice", "bob"] {
            let der = CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap();
            verifier
                .verify_client_cert(&der, &[], UnixTime::now())
                .unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let cn = cert.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), name);
            assert!(cert.subject_alternative_name().unwrap().is_none());
        }
        // The server certificate is not usable as a client certificate.
        let server = CertificateDer::from_pem_file(dir.join("server.pem")).unwrap();
        assert!(verifier
            .verify_client_cert(&server, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn validity_window() {
        let tmp = tempfile::tempdir().unwrap();
        init(&opts(tmp.path(), false)).unwrap();
        let der = CertificateDer::from_pem_file(tmp.path().join("alice.pem")).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        let day = DAY_SECS as i64;
        assert!((now - day - nb).abs() < 120, "not_before {nb} now {now}");
        assert!(
            (now + 825 * day - na).abs() < 120,
            "not_after {na} now {now}"
        );
    }

    #[test]
    fn rejects_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "ca", "Server", "a b"] {
            let o = CertsInit {
                dir: tmp.path().to_path_buf(),
                server_names: Vec::new(),
                clients: vec![bad.to_owned()],
                force: false,
            };
            assert!(
                matches!(init(&o), Err(PkiError::InvalidClientName { .. })),
                "{bad:?}"
            );
        }
        let dup = CertsInit {
            dir: tmp.path().to_path_buf(),
            server_names: Vec::new(),
            clients: vec!["x".to_owned(), "X".to_owned()],
            force: false,
        };
        assert!(matches!(
            init(&dup),
            Err(PkiError::InvalidClientName { .. })
        ));
        let bad_server = CertsInit {
            dir: tmp.path().to_path_buf(),
            server_names: vec!["not a host".to_owned()],
            clients: Vec::new(),
            force: false,
        };
        assert!(matches!(
            init(&bad_server),
            Err(PkiError::InvalidServerName { .. })
        ));
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn dev_pki_is_created_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        assert!(ensure_dev_pki(&dir).unwrap());
        let ca = std::fs::read(dir.join("ca.pem")).unwrap();
        assert!(!ensure_dev_pki(&dir).unwrap());
        assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
        assert_eq!(mode(&dir.join("dev.key")), 0o600);
        verify_server(&dir, "localhost").unwrap();

        // A missing piece triggers full regeneration.
        std::fs::remove_file(dir.join("dev.key")).unwrap();
        assert!(ensure_dev_pki(&dir).unwrap());
        assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
        assert!(!ensure_dev_pki(&dir).unwrap());
    }

    #[test]
    fn token_format() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        for t in [&a, &b] {
            assert_eq!(t.len(), 4 + 64);
            let hex = t.strip_prefix("pbt_").unwrap();
            assert!(hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        }
    }

    #[test]
    fn token_hash() {
        assert_eq!(
            token_sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(token_sha256_hex("").len(), 64);
    }
}
