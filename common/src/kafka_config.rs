//! Typed Kafka connection settings shared by the agent and the workers.
//!
//! [`KafkaConfig`] is what users write (the `[kafka]` table of a config file). [`KafkaConfig::
//! validate`] turns it into [`KafkaSettings`], a value that cannot be wrong in the ways we can
//! check offline: brokers parse, the security protocol has what it needs, every TLS file exists
//! and holds a currently valid certificate / matching key / a client certificate the configured
//! CA signed, and a SASL password is resolved from exactly one source. Each error names the
//! config key (and the file) that is wrong, so a device fails at start-up with a useful line
//! instead of reconnecting forever.
//!
//! Raw librdkafka options can be passed through `librdkafka`, except those the typed fields own
//! (they would silently override them).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use rdkafka::ClientConfig;
use serde::{Deserialize, Deserializer};

use crate::tls_files::{self, TlsFileError};

/// Connection settings for a Kafka cluster (`[kafka]` in the config files).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`; a list or one comma-separated string. Required.
    #[serde(deserialize_with = "string_or_list")]
    pub brokers: Vec<String>,
    /// `PLAINTEXT`, `SSL` (TLS, optionally with a client certificate: mTLS) or `SASL_SSL`.
    /// Default `PLAINTEXT`.
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// TLS files, for `SSL` and `SASL_SSL`.
    #[serde(default)]
    pub tls: TlsConfig,
    /// SASL credentials, for `SASL_SSL`.
    #[serde(default)]
    pub sasl: Option<SaslConfig>,
    /// Client id reported to the brokers (shows up in broker logs and quotas). Default: the
    /// component's name.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Extra librdkafka properties, passed through as they are (e.g. `"socket.keepalive.enable"
    /// = "true"`). Keys owned by the typed settings above are refused.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SecurityProtocol {
    #[default]
    #[serde(rename = "PLAINTEXT", alias = "plaintext")]
    Plaintext,
    #[serde(rename = "SSL", alias = "ssl")]
    Ssl,
    #[serde(rename = "SASL_SSL", alias = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslSsl => "sasl_ssl",
        }
    }
}

/// TLS files (PEM). All optional: with no `ca` the system's CA store is used; `certificate`
/// and `key` (both or neither) make the connection mutual TLS.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle that signed the brokers' certificates. Default: the system CA store.
    pub ca: Option<PathBuf>,
    /// Client certificate (chain) for mTLS.
    pub certificate: Option<PathBuf>,
    /// Private key of `certificate` (PKCS#8, PKCS#1 or SEC1; not encrypted).
    pub key: Option<PathBuf>,
    /// CA that issued the client certificate, when it is not `ca` (the brokers' CA). The client
    /// certificate must chain to this CA, or to `ca` when this is not set.
    pub client_ca: Option<PathBuf>,
    /// Check that the broker's certificate names the host we connect to. Default true; turn off
    /// only for brokers reached through addresses their certificates do not list.
    #[serde(default = "default_true")]
    pub verify_hostname: bool,
}

fn default_true() -> bool {
    true
}

/// SASL credentials. The password comes from exactly one of `password`, `password_env` or
/// `password_file`; it is never logged.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: SaslMechanism,
    pub username: String,
    /// The password itself (prefer `password_env` or `password_file`).
    pub password: Option<Secret>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (one line; a trailing newline is ignored).
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A secret string: its `Debug` and `Display` print `<redacted>`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself; call only where it is handed to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An invalid Kafka setting: the full config key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaConfigError {
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("config key `{key}`: {source}")]
    File {
        key: String,
        #[source]
        source: TlsFileError,
    },
}

/// librdkafka properties set from the typed fields; `librdkafka` may not set them.
const OWNED_KEYS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "security.protocol",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "client.id",
];

/// Validated settings, ready to configure an rdkafka client.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub brokers: Vec<String>,
    pub security_protocol: SecurityProtocol,
    pub tls: TlsConfig,
    sasl: Option<(SaslMechanism, String, Secret)>,
    pub client_id: Option<String>,
    pub librdkafka: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// A PLAINTEXT config for the given brokers (tests, tools).
    pub fn plaintext(brokers: impl Into<String>) -> Self {
        Self {
            brokers: split_list(&brokers.into()),
            security_protocol: SecurityProtocol::Plaintext,
            tls: TlsConfig::default(),
            sasl: None,
            client_id: None,
            librdkafka: BTreeMap::new(),
        }
    }

    /// An mTLS config for the given brokers and TLS files.
    pub fn mtls(brokers: impl Into<String>, ca: PathBuf, certificate: PathBuf, key: PathBuf) -> Self {
        Self {
            security_protocol: SecurityProtocol::Ssl,
            tls: TlsConfig {
                ca: Some(ca),
                certificate: Some(certificate),
                key: Some(key),
                client_ca: None,
                verify_hostname: true,
            },
            ..Self::plaintext(brokers)
        }
    }

    /// Validates the settings. `section` is the config table they came from (e.g. `kafka`),
    /// used to name keys in errors.
    pub fn validate(&self, section: &str) -> Result<KafkaSettings, KafkaConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let invalid = |k: &str, reason: String| KafkaConfigError::Invalid { key: key(k), reason };
        let file = |k: &str| {
            let key = key(k);
            move |source| KafkaConfigError::File { key, source }
        };

        if self.brokers.is_empty() {
            return Err(invalid("brokers", "at least one broker (`host:port`) is required".into()));
        }
        for b in &self.brokers {
            check_broker(b).map_err(|r| invalid("brokers", format!("{b:?}: {r}")))?;
        }

        let tls_used = self.security_protocol != SecurityProtocol::Plaintext;
        let tls = &self.tls;
        if !tls_used {
            for (name, set) in [
                ("tls.ca", tls.ca.is_some()),
                ("tls.certificate", tls.certificate.is_some()),
                ("tls.key", tls.key.is_some()),
                ("tls.client_ca", tls.client_ca.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        name,
                        "is set but `security_protocol` is PLAINTEXT: set it to SSL or SASL_SSL, \
                         or remove the TLS files"
                            .into(),
                    ));
                }
            }
        }
        if self.security_protocol != SecurityProtocol::SaslSsl && self.sasl.is_some() {
            return Err(invalid(
                "sasl",
                "is set but `security_protocol` is not SASL_SSL (SASL passwords are only sent over TLS)".into(),
            ));
        }

        let cas = match &tls.ca {
            Some(p) => Some(tls_files::load_ca(p).map_err(file("tls.ca"))?),
            None => None,
        };
        match (&tls.certificate, &tls.key) {
            (Some(cert), Some(key_path)) => {
                let client_ca = match &tls.client_ca {
                    Some(p) => Some((p, tls_files::load_ca(p).map_err(file("tls.client_ca"))?)),
                    None => tls.ca.as_ref().zip(cas.clone()),
                };
                let issuer = client_ca.as_ref().map(|(p, c)| (p.as_path(), c.as_slice()));
                tls_files::check_client_identity(cert, key_path, issuer).map_err(|e| {
                    let k = if e.path == *key_path { "tls.key" } else if e.path == *cert { "tls.certificate" } else { "tls.client_ca" };
                    file(k)(e)
                })?;
            }
            (Some(_), None) => return Err(invalid("tls.key", "is required when `tls.certificate` is set".into())),
            (None, Some(_)) => return Err(invalid("tls.certificate", "is required when `tls.key` is set".into())),
            (None, None) => {
                if tls.client_ca.is_some() {
                    return Err(invalid("tls.client_ca", "is set but there is no client certificate".into()));
                }
            }
        }

        let sasl = match (&self.security_protocol, &self.sasl) {
            (SecurityProtocol::SaslSsl, None) => {
                return Err(invalid("sasl", "is required when `security_protocol` is SASL_SSL".into()));
            }
            (SecurityProtocol::SaslSsl, Some(s)) => {
                if s.username.is_empty() {
                    return Err(invalid("sasl.username", "must not be empty".into()));
                }
                Some((s.mechanism, s.username.clone(), resolve_password(s, &key)?))
            }
            _ => None,
        };

        for k in self.librdkafka.keys() {
            if OWNED_KEYS.contains(&k.as_str()) {
                return Err(invalid(
                    &format!("librdkafka.\"{k}\""),
                    "is set by framelink's typed settings; use those instead".into(),
                ));
            }
        }

        Ok(KafkaSettings {
            brokers: self.brokers.clone(),
            security_protocol: self.security_protocol,
            tls: tls.clone(),
            sasl,
            client_id: self.client_id.clone(),
            librdkafka: self.librdkafka.clone(),
        })
    }
}

fn resolve_password(s: &SaslConfig, key: &dyn Fn(&str) -> String) -> Result<Secret, KafkaConfigError> {
    let invalid = |k: &str, reason: String| KafkaConfigError::Invalid { key: key(k), reason };
    let sources = [s.password.is_some(), s.password_env.is_some(), s.password_file.is_some()];
    if sources.iter().filter(|x| **x).count() != 1 {
        return Err(invalid(
            "sasl.password",
            "give exactly one of `password`, `password_env`, `password_file`".into(),
        ));
    }
    if let Some(p) = &s.password {
        return Ok(p.clone());
    }
    if let Some(var) = &s.password_env {
        return std::env::var(var)
            .map(Secret)
            .map_err(|_| invalid("sasl.password_env", format!("environment variable {var:?} is not set")));
    }
    let path = s.password_file.as_ref().expect("one source is set");
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("sasl.password_file", format!("{}: cannot read: {e}", path.display())))?;
    let pw = text.strip_suffix('\n').unwrap_or(&text);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        return Err(invalid("sasl.password_file", format!("{}: is empty", path.display())));
    }
    Ok(Secret(pw.to_owned()))
}

fn check_broker(b: &str) -> Result<(), String> {
    let (host, port) = b.rsplit_once(':').ok_or("expected `host:port`")?;
    if host.is_empty() {
        return Err("empty host".into());
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port:?} is not a number from 1 to 65535"))?;
    Ok(())
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

/// Accepts `["a:1", "b:2"]` or `"a:1,b:2"` (the form an environment variable gives).
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => split_list(&s),
        OneOrMany::Many(v) => v.iter().flat_map(|s| split_list(s)).collect(),
    })
}

impl KafkaSettings {
    /// The rdkafka client configuration for these settings. Callers add producer- or
    /// consumer-specific properties on top.
    pub fn client_config(&self, default_client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        // rdkafka derives librdkafka's log level from the `log` crate's, which is off unless a
        // `log` logger is installed; connection failures are logged at INFO ("FAIL") and are
        // what `link::LinkContext` diagnoses from, so always ask for them.
        c.set_log_level(rdkafka::config::RDKafkaLogLevel::Info);
        c.set("bootstrap.servers", self.brokers.join(","));
        c.set("client.id", self.client_id.as_deref().unwrap_or(default_client_id));
        c.set("security.protocol", self.security_protocol.as_librdkafka());
        if self.security_protocol != SecurityProtocol::Plaintext {
            if let Some(ca) = &self.tls.ca {
                c.set("ssl.ca.location", ca.display().to_string());
            }
            if let (Some(cert), Some(key)) = (&self.tls.certificate, &self.tls.key) {
                c.set("ssl.certificate.location", cert.display().to_string());
                c.set("ssl.key.location", key.display().to_string());
            }
            c.set(
                "ssl.endpoint.identification.algorithm",
                if self.tls.verify_hostname { "https" } else { "none" },
            );
        }
        if let Some((mechanism, user, password)) = &self.sasl {
            c.set("sasl.mechanism", mechanism.as_str());
            c.set("sasl.username", user);
            c.set("sasl.password", password.expose());
        }
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c
    }

    /// One line for logs: protocol, brokers, and whether a client certificate is used.
    pub fn describe(&self) -> String {
        let mut s = format!("{} to {}", self.security_protocol.as_librdkafka().to_ascii_uppercase(), self.brokers.join(","));
        if self.tls.certificate.is_some() {
            s.push_str(" with a client certificate (mTLS)");
        }
        if let Some((m, user, _)) = &self.sasl {
            s.push_str(&format!(" as SASL {} user {user:?}", m.as_str()));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls_files::testcerts::*;

    fn parse(toml_text: &str) -> Result<KafkaConfig, String> {
        crate::config_file::from_toml_str::<KafkaConfig>(toml_text).map_err(|e| e.to_string())
    }

    #[test]
    fn brokers_as_list_or_string() {
        let a = parse(r#"brokers = ["a:1", "b:2"]"#).unwrap();
        let b = parse(r#"brokers = "a:1, b:2""#).unwrap();
        assert_eq!(a.brokers, vec!["a:1", "b:2"]);
        assert_eq!(a.brokers, b.brokers);
        assert_eq!(a.validate("kafka").unwrap().security_protocol, SecurityProtocol::Plaintext);
    }

    #[test]
    fn bad_brokers_are_named() {
        for (text, needle) in [
            (r#"brokers = []"#, "at least one broker"),
            (r#"brokers = "nohost""#, "host:port"),
            (r#"brokers = "h:99999""#, "99999"),
            (r#"brokers = ":9092""#, "empty host"),
        ] {
            let e = parse(text).unwrap().validate("kafka").unwrap_err();
            assert!(matches!(&e, KafkaConfigError::Invalid { key, .. } if key == "kafka.brokers"), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("brokers = \"a:1\"\nsecurity_protcol = \"SSL\"").unwrap_err();
        assert!(e.contains("security_protcol"), "{e}");
        let e = parse("brokers = \"a:1\"\nsecurity_protocol = \"TLS\"").unwrap_err();
        assert!(e.contains("TLS") && e.contains("security_protocol"), "{e}");
    }

    #[test]
    fn mtls_config_validates_and_maps_to_librdkafka() {
        let dir = tempfile::tempdir().unwrap();
        let ca_ = ca("CA");
        let (cert, key) = client(&ca_, -1, 10);
        let cfg = KafkaConfig::mtls(
            "127.0.0.1:9093",
            write(dir.path(), "ca.pem", &ca_.cert_pem),
            write(dir.path(), "c.pem", &cert),
            write(dir.path(), "c.key", &key),
        );
        let s = cfg.validate("kafka").unwrap();
        let c = s.client_config("test");
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        assert_eq!(c.get("ssl.ca.location"), Some(dir.path().join("ca.pem").to_str().unwrap()));
        assert_eq!(c.get("ssl.key.location"), Some(dir.path().join("c.key").to_str().unwrap()));
        assert_eq!(c.get("ssl.endpoint.identification.algorithm"), Some("https"));
        assert!(s.describe().contains("mTLS"));
    }

    #[test]
    fn tls_errors_name_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca_ = ca("CA");
        let (cert, key) = client(&ca_, -1, 10);
        let (_, other_key) = client(&ca_, -1, 10);
        let ca_p = write(dir.path(), "ca.pem", &ca_.cert_pem);
        let cert_p = write(dir.path(), "c.pem", &cert);
        let key_p = write(dir.path(), "c.key", &key);
        let other_p = write(dir.path(), "o.key", &other_key);

        let mut cfg = KafkaConfig::mtls("h:1", ca_p.clone(), cert_p.clone(), other_p.clone());
        let e = cfg.validate("kafka").unwrap_err();
        assert!(matches!(&e, KafkaConfigError::File { key, source } if key == "kafka.tls.key" && source.path == other_p), "{e}");

        cfg.tls.key = Some(key_p.clone());
        cfg.tls.ca = Some(dir.path().join("missing-ca.pem"));
        let e = cfg.validate("kafka").unwrap_err().to_string();
        assert!(e.contains("kafka.tls.ca") && e.contains("missing-ca.pem") && e.contains("cannot read"), "{e}");

        let rogue = ca("rogue");
        cfg.tls.ca = Some(ca_p.clone());
        cfg.tls.client_ca = Some(write(dir.path(), "rogue.pem", &rogue.cert_pem));
        let e = cfg.validate("kafka").unwrap_err().to_string();
        assert!(e.contains("kafka.tls.certificate") && e.contains("not signed by the CA in"), "{e}");

        cfg.tls.client_ca = None;
        cfg.tls.key = None;
        let e = cfg.validate("kafka").unwrap_err().to_string();
        assert!(e.contains("kafka.tls.key") && e.contains("required"), "{e}");

        let mut plain = KafkaConfig::plaintext("h:1");
        plain.tls.ca = Some(ca_p);
        let e = plain.validate("kafka").unwrap_err().to_string();
        assert!(e.contains("kafka.tls.ca") && e.contains("PLAINTEXT"), "{e}");
    }

    #[test]
    fn sasl_password_sources_and_redaction() {
        let dir = tempfile::tempdir().unwrap();
        let pw_file = write(dir.path(), "pw", "s3cret\n");
        let base = format!(
            "brokers = \"h:1\"\nsecurity_protocol = \"SASL_SSL\"\n[sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"edge\"\n"
        );
        let cfg = parse(&format!("{base}password_file = {:?}", pw_file.display().to_string())).unwrap();
        let s = cfg.validate("kafka").unwrap();
        let c = s.client_config("t");
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert!(!format!("{s:?} {cfg:?} {}", s.describe()).contains("s3cret"));

        let cfg = parse(&format!("{base}password = \"inline\"")).unwrap();
        assert!(!format!("{cfg:?}").contains("inline"));
        cfg.validate("kafka").unwrap();

        let e = parse(&format!("{base}password = \"a\"\npassword_env = \"B\"")).unwrap().validate("kafka").unwrap_err();
        assert!(e.to_string().contains("kafka.sasl.password") && e.to_string().contains("exactly one"), "{e}");
        let e = parse(&format!("{base}password_env = \"FRAMELINK_TEST_UNSET_VAR_4711\"")).unwrap().validate("kafka").unwrap_err();
        assert!(e.to_string().contains("FRAMELINK_TEST_UNSET_VAR_4711"), "{e}");
        let e = parse("brokers = \"h:1\"\nsecurity_protocol = \"SASL_SSL\"").unwrap().validate("kafka").unwrap_err();
        assert!(e.to_string().contains("kafka.sasl"), "{e}");
    }

    #[test]
    fn passthrough_cannot_override_typed_keys() {
        let cfg = parse("brokers = \"h:1\"\n[librdkafka]\n\"sasl.password\" = \"x\"").unwrap();
        let e = cfg.validate("kafka").unwrap_err().to_string();
        assert!(e.contains("sasl.password") && e.contains("typed"), "{e}");
        let cfg = parse("brokers = \"h:1\"\n[librdkafka]\n\"socket.keepalive.enable\" = \"true\"").unwrap();
        let c = cfg.validate("kafka").unwrap().client_config("t");
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
    }
}
