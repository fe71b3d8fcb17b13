//! Checks of TLS material (PEM files) made before any connection is tried.
//!
//! librdkafka reports bad certificates late and vaguely: an expired client certificate or a
//! key that belongs to another certificate shows up as a broker disconnect minutes after start.
//! A device in a field with a bad certificate must say so at start-up, naming the file and the
//! reason, so these checks run when the config is loaded. They use rustls' PEM/X.509 types and
//! webpki (the verifier rustls itself uses) for chain checks, and x509-parser to read validity
//! dates for readable messages.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::ring as provider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// A problem with one TLS file; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct TlsFileError {
    pub path: PathBuf,
    pub reason: String,
}

fn err(path: &Path, reason: impl Into<String>) -> TlsFileError {
    TlsFileError {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn pem_reason(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind found".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// Reads every certificate in a PEM file (at least one).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    // Read first so that a missing or unreadable file says so plainly.
    std::fs::metadata(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(path, pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, pem_reason(e)))?;
    if certs.is_empty() {
        return Err(err(path, "no `BEGIN CERTIFICATE` block found"));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC; not encrypted).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let text = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    const ENCRYPTED: &[u8] = b"BEGIN ENCRYPTED PRIVATE KEY";
    if text.windows(ENCRYPTED.len()).any(|w| w == ENCRYPTED) {
        return Err(err(
            path,
            "the private key is encrypted; framelink needs an unencrypted key file \
             (protect it with file permissions: mode 0600, owned by the service user)",
        ));
    }
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => err(path, "no private key (`BEGIN ... PRIVATE KEY`) found"),
        other => err(path, pem_reason(other)),
    })
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The start of the certificate's validity (Unix seconds), if it parses.
fn not_before(cert: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert.as_ref()).ok().map(|(_, c)| c.validity().not_before.timestamp())
}

/// Fails if the certificate is expired or not yet valid at `now` (Unix seconds).
pub fn check_validity_at(path: &Path, cert: &CertificateDer<'_>, now: i64) -> Result<(), TlsFileError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| err(path, format!("not a valid X.509 certificate: {e}")))?;
    let validity = parsed.validity();
    let subject = parsed.subject().to_string();
    if now < validity.not_before.timestamp() {
        return Err(err(
            path,
            format!(
                "certificate `{subject}` is not valid yet: valid from {} (check the device clock)",
                validity.not_before
            ),
        ));
    }
    if now > validity.not_after.timestamp() {
        return Err(err(
            path,
            format!("certificate `{subject}` expired on {}", validity.not_after),
        ));
    }
    Ok(())
}

/// Fails if the private key is not the one the (first) certificate was issued for.
pub fn check_key_matches(
    cert_path: &Path,
    certs: &[CertificateDer<'static>],
    key_path: &Path,
    key: &PrivateKeyDer<'static>,
) -> Result<(), TlsFileError> {
    let signing_key = provider::sign::any_supported_type(key)
        .map_err(|e| err(key_path, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(certs.to_vec(), signing_key);
    certified.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => err(
            key_path,
            format!("the private key does not match the certificate in {}", cert_path.display()),
        ),
        other => err(key_path, format!("cannot compare with {}: {other}", cert_path.display())),
    })
}

/// Fails unless the certificate chain in `cert_path` leads, for client authentication, to one
/// of the CA certificates in `ca_path`.
pub fn check_signed_by(
    cert_path: &Path,
    certs: &[CertificateDer<'static>],
    ca_path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<(), TlsFileError> {
    check_signed_by_at(cert_path, certs, ca_path, cas, UnixTime::now())
}

/// As [`check_signed_by`], verifying the chain as of `at`.
fn check_signed_by_at(
    cert_path: &Path,
    certs: &[CertificateDer<'static>],
    ca_path: &Path,
    cas: &[CertificateDer<'static>],
    at: UnixTime,
) -> Result<(), TlsFileError> {
    let anchors = cas
        .iter()
        .map(|ca| {
            webpki::anchor_from_trusted_cert(ca)
                .map(|a| a.to_owned())
                .map_err(|e| err(ca_path, format!("not usable as a CA certificate: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let end_entity = webpki::EndEntityCert::try_from(&certs[0])
        .map_err(|e| err(cert_path, format!("not a valid end-entity certificate: {e}")))?;
    let algorithms = provider::default_provider().signature_verification_algorithms;
    end_entity
        .verify_for_usage(
            algorithms.all,
            &anchors,
            &certs[1..],
            at,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| {
            let why = match e {
                webpki::Error::UnknownIssuer => format!("is not signed by the CA in {}", ca_path.display()),
                webpki::Error::InvalidSignatureForPublicKey => {
                    format!("has a signature that the CA in {} did not make", ca_path.display())
                }
                other => format!("does not verify against the CA in {}: {other}", ca_path.display()),
            };
            err(cert_path, format!("client certificate {why}"))
        })
}

/// Warns (naming the file and its mode) when a secret file is readable or writable by its group
/// or others (`mode & 0o077 != 0`). A warning, not an error: the group may be the service's own.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "{what} {} has mode {mode:04o}: its group or others can read it; \
                     make it 0600, owned by the service user (chmod 600 {})",
                    path.display(),
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}

/// Whether a certificate outside its validity period (by this machine's clock) is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValidityCheck {
    /// Expired or not yet valid is an error (`check-config`, the worker).
    Enforce,
    /// Logged as a warning only: an edge device without a real-time clock boots in the past
    /// until NTP sets it, and must capture and spool meanwhile (TLS fails until then).
    WarnOnly,
}

fn validity(path: &Path, cert: &CertificateDer<'_>, check: ValidityCheck) -> Result<(), TlsFileError> {
    match check_validity_at(path, cert, now_unix()) {
        Err(e) if check == ValidityCheck::WarnOnly && !e.reason.starts_with("not a valid") => {
            tracing::warn!(file = %e.path.display(), reason = e.reason, "Certificate outside its validity period by this machine's clock: starting anyway (capture and spooling go on; TLS to Kafka fails until the clock or the certificate is right). `check-config` treats this as an error.");
            Ok(())
        }
        r => r,
    }
}

/// Reads a CA bundle and checks each CA is currently valid.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    load_ca_with(path, ValidityCheck::Enforce)
}

/// As [`load_ca`], with the validity period checked as `check` says.
pub fn load_ca_with(path: &Path, check: ValidityCheck) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let cas = read_certificates(path)?;
    for ca in &cas {
        validity(path, ca, check)?;
    }
    Ok(cas)
}

/// Reads a client certificate and its key and checks validity, the key pair, and — when
/// `issuer` is given — that a CA in it signed the certificate.
pub fn check_client_identity(
    cert_path: &Path,
    key_path: &Path,
    issuer: Option<(&Path, &[CertificateDer<'static>])>,
) -> Result<(), TlsFileError> {
    check_client_identity_with(cert_path, key_path, issuer, ValidityCheck::Enforce)
}

/// As [`check_client_identity`], with the validity period checked as `check` says.
pub fn check_client_identity_with(
    cert_path: &Path,
    key_path: &Path,
    issuer: Option<(&Path, &[CertificateDer<'static>])>,
    check: ValidityCheck,
) -> Result<(), TlsFileError> {
    let certs = read_certificates(cert_path)?;
    let key = read_private_key(key_path)?;
    warn_if_readable_by_others(key_path, "private key");
    validity(cert_path, &certs[0], check)?;
    check_key_matches(cert_path, &certs, key_path, &key)?;
    if let Some((ca_path, cas)) = issuer {
        // With a clock that may be wrong (WarnOnly), the chain is checked as of a moment the
        // certificate is valid: its start. The signature and issuer still have to match.
        let at = match check {
            ValidityCheck::Enforce => UnixTime::now(),
            ValidityCheck::WarnOnly => not_before(&certs[0]).filter(|nb| *nb > now_unix()).map_or_else(UnixTime::now, |nb| UnixTime::since_unix_epoch(std::time::Duration::from_secs(nb as u64 + 1))),
        };
        check_signed_by_at(cert_path, &certs, ca_path, cas, at)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testcerts {
    //! Certificates made with rcgen for the tests of this crate.
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use std::path::{Path, PathBuf};
    use time::{Duration, OffsetDateTime};

    pub struct Ca {
        pub cert_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    pub fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate signed by `ca`, valid from `from` to `to` days relative to now.
    pub fn client(ca: &Ca, from_days: i64, to_days: i64) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "test-client");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now + Duration::days(from_days);
        params.not_after = now + Duration::days(to_days);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::testcerts::*;
    use super::*;

    struct Files {
        _dir: tempfile::TempDir,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        dir: PathBuf,
    }

    fn good() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca_ = ca("test CA");
        let (cert, key) = client(&ca_, -1, 30);
        Files {
            ca: write(dir.path(), "ca.pem", &ca_.cert_pem),
            cert: write(dir.path(), "client.pem", &cert),
            key: write(dir.path(), "client.key", &key),
            dir: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    fn check(f: &Files, cert: &Path, key: &Path) -> Result<(), TlsFileError> {
        let cas = load_ca(&f.ca)?;
        check_client_identity(cert, key, Some((&f.ca, &cas)))
    }

    #[test]
    fn accepts_a_good_identity() {
        let f = good();
        check(&f, &f.cert, &f.key).unwrap();
    }

    #[test]
    fn missing_file_is_named() {
        let f = good();
        let missing = f.dir.join("nope.pem");
        let e = check(&f, &missing, &f.key).unwrap_err();
        assert_eq!(e.path, missing);
        assert!(e.reason.contains("cannot read"), "{e}");
        let e = load_ca(&f.dir.join("no-ca.pem")).unwrap_err();
        assert!(e.to_string().contains("no-ca.pem"), "{e}");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let f = good();
        let junk = write(&f.dir, "junk.pem", "hello\n");
        let e = check(&f, &junk, &f.key).unwrap_err();
        assert_eq!(e.path, junk);
        assert!(e.reason.contains("CERTIFICATE") || e.reason.contains("PEM"), "{e}");
        let e = check(&f, &f.cert, &junk).unwrap_err();
        assert!(e.reason.contains("private key"), "{e}");
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let f = good();
        let ca_ = ca("second");
        let ca_path = write(&f.dir, "ca2.pem", &ca_.cert_pem);
        let cas = load_ca(&ca_path).unwrap();
        let (old, old_key) = client(&ca_, -30, -1);
        let (old, old_key) = (write(&f.dir, "old.pem", &old), write(&f.dir, "old.key", &old_key));
        let e = check_client_identity(&old, &old_key, Some((&ca_path, &cas))).unwrap_err();
        assert_eq!(e.path, old);
        assert!(e.reason.contains("expired on"), "{e}");
        let (new, new_key) = client(&ca_, 2, 30);
        let (new, new_key) = (write(&f.dir, "new.pem", &new), write(&f.dir, "new.key", &new_key));
        let e = check_client_identity(&new, &new_key, Some((&ca_path, &cas))).unwrap_err();
        assert!(e.reason.contains("not valid yet"), "{e}");
    }

    /// A device clock before the certificate's start (a board without RTC before NTP): the
    /// agent's `run` starts anyway (with a warning); a bad key still fails.
    #[test]
    fn warn_only_lets_a_not_yet_valid_identity_through_but_not_a_broken_one() {
        let f = good();
        let ca_ = ca("third");
        let ca_path = write(&f.dir, "ca3.pem", &ca_.cert_pem);
        let cas = load_ca(&ca_path).unwrap();
        let (new, new_key) = client(&ca_, 2, 30);
        let (new, new_key) = (write(&f.dir, "new.pem", &new), write(&f.dir, "new.key", &new_key));
        check_client_identity_with(&new, &new_key, Some((&ca_path, &cas)), ValidityCheck::WarnOnly).unwrap();
        let (_, other_key) = client(&ca("y"), -1, 30);
        let other_key = write(&f.dir, "other.key", &other_key);
        assert!(check_client_identity_with(&new, &other_key, Some((&ca_path, &cas)), ValidityCheck::WarnOnly).is_err(), "a key of another certificate still fails");
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let f = good();
        let (_, other_key) = client(&ca("x"), -1, 30);
        let other_key = write(&f.dir, "other.key", &other_key);
        let e = check(&f, &f.cert, &other_key).unwrap_err();
        assert_eq!(e.path, other_key);
        assert!(e.reason.contains("does not match the certificate"), "{e}");
    }

    #[test]
    fn certificate_from_another_ca_is_refused() {
        let f = good();
        let (cert, key) = client(&ca("rogue CA"), -1, 30);
        let (cert, key) = (write(&f.dir, "rogue.pem", &cert), write(&f.dir, "rogue.key", &key));
        let e = check(&f, &cert, &key).unwrap_err();
        assert_eq!(e.path, cert);
        assert!(e.reason.contains("not signed by the CA"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn key_readable_by_others_is_warned() {
        use std::os::unix::fs::PermissionsExt;
        let f = good();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&f.key, std::fs::Permissions::from_mode(mode)).unwrap();
            let (r, log) = crate::testlog::capture(|| check(&f, &f.cert, &f.key));
            r.unwrap();
            let needle = format!("{}", f.key.display());
            assert!(log.contains("WARN") && log.contains(&needle) && log.contains(&format!("{mode:04o}")), "{mode:o}: {log}");
        }
        std::fs::set_permissions(&f.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (r, log) = crate::testlog::capture(|| check(&f, &f.cert, &f.key));
        r.unwrap();
        assert!(!log.contains("WARN"), "{log}");
    }

    #[test]
    fn encrypted_key_is_refused_with_a_reason() {
        let f = good();
        let k = write(
            &f.dir,
            "enc.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let e = check(&f, &f.cert, &k).unwrap_err();
        assert!(e.reason.contains("encrypted"), "{e}");
    }
}
