//! Authenticate the remote peer from transport facts (its verified client certificate,
//! its `Authorization: Bearer` token) into an [`Identity`]. Token hashes are compared in
//! constant time against every configured identity. Never touches the OS.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AllowRule, IdentityConfig, PipeConfig};
use crate::error::{Refusal, RefusalKind};

/// How the peer proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A client certificate.
    Certificate,
    /// A bearer token.
    Token,
    /// Both, mapping to the same identity.
    CertificateAndToken,
}

impl AuthMethod {
    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Certificate => "certificate",
            AuthMethod::Token => "token",
            AuthMethod::CertificateAndToken => "certificate+token",
        }
    }
}

/// Who the remote client proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `[[identity]]` name.
    pub name: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// How it authenticated.
    pub method: AuthMethod,
}

/// The names a verified client certificate carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// Subject common names.
    pub cn: Vec<String>,
    /// URI subject alternative names.
    pub san_uri: Vec<String>,
    /// DNS subject alternative names.
    pub san_dns: Vec<String>,
    /// When it expires (`notAfter`), in seconds since the Unix epoch.
    pub not_after: u64,
}

impl CertNames {
    /// Extracts names from a DER certificate (already verified by rustls).
    pub fn from_der(der: &[u8]) -> Option<CertNames> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut out = CertNames {
            not_after: epoch_secs(&cert),
            ..CertNames::default()
        };
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                out.cn.push(s.to_string());
            }
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::URI(u) => out.san_uri.push(u.to_string()),
                    GeneralName::DNSName(d) => out.san_dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        Some(out)
    }
}

/// A certificate's `notAfter`, in seconds since the Unix epoch (`None` if it does not
/// parse; a certificate rustls verified does).
pub fn not_after(cert: &rustls::pki_types::CertificateDer<'_>) -> Option<u64> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .ok()
        .map(|(_, x)| epoch_secs(&x))
}

fn epoch_secs(cert: &x509_parser::certificate::X509Certificate<'_>) -> u64 {
    u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0)
}

fn cert_matches(id: &IdentityConfig, names: &CertNames) -> bool {
    let mut any = false;
    for (want, have) in [
        (&id.cert_cn, &names.cn),
        (&id.cert_san_uri, &names.san_uri),
        (&id.cert_san_dns, &names.san_dns),
    ] {
        if let Some(w) = want {
            if !have.iter().any(|h| h == w) {
                return false;
            }
            any = true;
        }
    }
    any
}

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Maps transport facts to an identity, or a 401 refusal.
pub fn authenticate(
    identities: &[IdentityConfig],
    cert: Option<&CertNames>,
    bearer: Option<&str>,
) -> Result<Identity, Refusal> {
    authenticate_hashed(identities, cert, bearer.map(token_hash).as_ref())
}

/// [`authenticate`] with the token's SHA-256 (what a live session keeps of it, to be
/// authenticated again when a reload changes the identities).
pub fn authenticate_hashed(
    identities: &[IdentityConfig],
    cert: Option<&CertNames>,
    token: Option<&[u8; 32]>,
) -> Result<Identity, Refusal> {
    let by_cert = match cert {
        Some(names) => match identities.iter().position(|id| cert_matches(id, names)) {
            Some(i) => Some(i),
            None => {
                return Err(Refusal::new(
                    RefusalKind::Unauthenticated,
                    "the client certificate does not match any identity",
                ))
            }
        },
        None => None,
    };
    let by_token = match token {
        Some(h) => {
            // Compare against every identity, without early exit.
            let mut found: Option<usize> = None;
            for (i, id) in identities.iter().enumerate() {
                if let Some(want) = &id.token_sha256 {
                    if bool::from(want.ct_eq(h)) && found.is_none() {
                        found = Some(i);
                    }
                }
            }
            match found {
                Some(i) => Some(i),
                None => {
                    return Err(Refusal::new(
                        RefusalKind::Unauthenticated,
                        "the token is not valid",
                    ))
                }
            }
        }
        None => None,
    };
    let (idx, method) = match (by_cert, by_token) {
        (Some(c), Some(t)) if c == t => (c, AuthMethod::CertificateAndToken),
        (Some(_), Some(_)) => {
            return Err(Refusal::new(
                RefusalKind::Unauthenticated,
                "the client certificate and the token name different identities",
            ))
        }
        (Some(c), None) => (c, AuthMethod::Certificate),
        (None, Some(t)) => (t, AuthMethod::Token),
        (None, None) => {
            return Err(Refusal::new(
                RefusalKind::Unauthenticated,
                "credentials required: a client certificate or an Authorization: Bearer token",
            ))
        }
    };
    let id = &identities[idx];
    Ok(Identity {
        name: id.name.clone(),
        groups: id.groups.clone(),
        method,
    })
}

/// Parses an `Authorization` header value; `Some(Err)` for a malformed one.
pub fn bearer(header: Option<&[u8]>) -> Result<Option<&str>, Refusal> {
    let Some(h) = header else { return Ok(None) };
    let s = std::str::from_utf8(h).map_err(|_| {
        Refusal::new(
            RefusalKind::Unauthenticated,
            "malformed Authorization header",
        )
    })?;
    let (scheme, token) = s.split_once(' ').unwrap_or((s, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Refusal::new(
            RefusalKind::Unauthenticated,
            "the Authorization header must be \"Bearer TOKEN\"",
        ));
    }
    Ok(Some(token.trim()))
}

/// Whether `identity` may use `pipe` (its allow list; default deny).
pub fn allowed(identity: &Identity, pipe: &PipeConfig) -> bool {
    pipe.allow.iter().any(|rule| match rule {
        AllowRule::Identity(n) => *n == identity.name,
        AllowRule::Group(g) => identity.groups.iter().any(|x| x == g),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(name: &str, cn: Option<&str>, token: Option<&str>, groups: &[&str]) -> IdentityConfig {
        IdentityConfig {
            name: name.into(),
            cert_cn: cn.map(Into::into),
            cert_san_uri: None,
            cert_san_dns: None,
            token_sha256: token.map(token_hash),
            token_sha256_file: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            principal: None,
        }
    }

    fn names(cn: &str) -> CertNames {
        CertNames {
            cn: vec![cn.into()],
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        let ids = vec![
            ident("alice", Some("alice"), Some("ta"), &["ops"]),
            ident("bob", Some("bob"), Some("tb"), &[]),
        ];
        let a = authenticate(&ids, Some(&names("alice")), None).unwrap();
        assert_eq!(
            (a.name.as_str(), a.method),
            ("alice", AuthMethod::Certificate)
        );
        let b = authenticate(&ids, None, Some("tb")).unwrap();
        assert_eq!((b.name.as_str(), b.method), ("bob", AuthMethod::Token));
        let both = authenticate(&ids, Some(&names("alice")), Some("ta")).unwrap();
        assert_eq!(both.method, AuthMethod::CertificateAndToken);
        for (cert, tok) in [
            (None, None),
            (Some(names("mallory")), None),
            (None, Some("nope")),
            (Some(names("alice")), Some("tb")),
            (Some(names("mallory")), Some("ta")),
        ] {
            let e = authenticate(&ids, cert.as_ref(), tok).unwrap_err();
            assert_eq!(e.kind, RefusalKind::Unauthenticated);
        }
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(None).unwrap(), None);
        assert_eq!(bearer(Some(b"Bearer abc")).unwrap(), Some("abc"));
        assert_eq!(bearer(Some(b"bearer abc")).unwrap(), Some("abc"));
        assert!(bearer(Some(b"Basic abc")).is_err());
        assert!(bearer(Some(b"Bearer ")).is_err());
        assert!(bearer(Some(b"\xff")).is_err());
    }
}
