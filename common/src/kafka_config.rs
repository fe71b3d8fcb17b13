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
//! Raw librdkafka options can be passed through `librdkafka`, except those framelink sets itself
//! and their librdkafka aliases (they would silently override them, or be overridden), TLS and
//! SASL settings that have no typed key, and — unless `allow_insecure = true`, which then warns
//! at every start — settings that turn off or can weaken TLS verification.

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
    /// = "true"`). Refused: properties framelink sets (from the typed settings above or the
    /// component's own) and their librdkafka aliases, TLS and SASL properties without a typed
    /// key (keystores, engines, OAUTHBEARER, Kerberos), and, unless `allow_insecure` is set,
    /// properties that turn off or can weaken TLS verification.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
    /// Accept `librdkafka` properties that turn off or can weaken TLS verification
    /// (`enable.ssl.certificate.verification = "false"`, `ssl.cipher.suites`, `ssl.curves.list`,
    /// `ssl.sigalgs.list`, `ssl.providers`). Default false: they are refused. When true, every
    /// start logs a warning naming each of them.
    #[serde(default)]
    pub allow_insecure: bool,
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
#[derive(Clone, Debug, Deserialize)]
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

/// Not derived: the derived default would turn `verify_hostname` off whenever the `[tls]` table
/// is left out (the field's serde default applies only inside the table).
impl Default for TlsConfig {
    fn default() -> Self {
        Self { ca: None, certificate: None, key: None, client_ca: None, verify_hostname: true }
    }
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

/// What to set instead of a refused `librdkafka` property.
#[derive(Clone, Copy)]
enum Instead {
    /// A key of this section (`brokers` → `kafka.brokers`).
    Key(&'static str),
    /// A key of the component's own config, as a phrase.
    Component(&'static str),
    /// Nothing: framelink always sets it this way, for the reason given.
    Fixed(&'static str),
}

/// librdkafka properties framelink sets — from this section's typed keys, or in the agent's and
/// workers' clients — with the property each is an alias of (librdkafka's `CONFIGURATION.md`,
/// `rdkafka_conf.c`). A pass-through value for one of them would be replaced by framelink's
/// without a word, or, through an alias, win or lose against it depending on the order the
/// client applies them.
const OWNED: &[(&str, Option<&str>, Instead)] = &[
    ("metadata.broker.list", None, Instead::Key("brokers")),
    ("bootstrap.servers", Some("metadata.broker.list"), Instead::Key("brokers")),
    ("security.protocol", None, Instead::Key("security_protocol")),
    ("ssl.ca.location", None, Instead::Key("tls.ca")),
    ("ssl.ca.pem", None, Instead::Key("tls.ca")),
    ("ssl_ca", None, Instead::Key("tls.ca")),
    ("ssl.certificate.location", None, Instead::Key("tls.certificate")),
    ("ssl.certificate.pem", None, Instead::Key("tls.certificate")),
    ("ssl_certificate", None, Instead::Key("tls.certificate")),
    ("ssl.key.location", None, Instead::Key("tls.key")),
    ("ssl.key.pem", None, Instead::Key("tls.key")),
    ("ssl_key", None, Instead::Key("tls.key")),
    ("ssl.endpoint.identification.algorithm", None, Instead::Key("tls.verify_hostname")),
    ("sasl.mechanisms", None, Instead::Key("sasl.mechanism")),
    ("sasl.mechanism", Some("sasl.mechanisms"), Instead::Key("sasl.mechanism")),
    ("sasl.username", None, Instead::Key("sasl.username")),
    ("sasl.password", None, Instead::Key("sasl.password")),
    ("client.id", None, Instead::Key("client_id")),
    // Set by the agent's forwarder and the workers' producers and consumers.
    ("request.required.acks", None, Instead::Fixed("its producers always wait for all in-sync replicas (acks=all)")),
    ("acks", Some("request.required.acks"), Instead::Fixed("its producers always wait for all in-sync replicas (acks=all)")),
    ("enable.idempotence", None, Instead::Fixed("its producers are always idempotent")),
    ("message.timeout.ms", None, Instead::Component("the agent's `forwarder.message_timeout_ms` (workers never give up on an output)")),
    ("delivery.timeout.ms", Some("message.timeout.ms"), Instead::Component("the agent's `forwarder.message_timeout_ms` (workers never give up on an output)")),
    ("queue.buffering.max.ms", None, Instead::Component("the agent's `forwarder.linger_ms`")),
    ("linger.ms", Some("queue.buffering.max.ms"), Instead::Component("the agent's `forwarder.linger_ms`")),
    ("queue.buffering.max.kbytes", None, Instead::Component("the agent's `forwarder.queue_max_bytes`")),
    ("queue.buffering.max.messages", None, Instead::Component("the agent's `forwarder.queue_max_bytes`")),
    ("message.max.bytes", None, Instead::Component("the agent's `forwarder.max_message_bytes`")),
    ("transactional.id", None, Instead::Component("the worker's `worker.delivery`")),
    ("transaction.timeout.ms", None, Instead::Component("the worker's `worker.delivery`")),
    ("enable.auto.commit", None, Instead::Fixed("an input is committed only after its outputs (the worker's `worker.delivery`)")),
    ("auto.commit.enable", None, Instead::Fixed("an input is committed only after its outputs (the worker's `worker.delivery`)")),
    ("enable.auto.offset.store", None, Instead::Fixed("an input is committed only after its outputs (the worker's `worker.delivery`)")),
    ("isolation.level", None, Instead::Fixed("workers read only committed records (the worker's `worker.delivery`)")),
    ("group.id", None, Instead::Component("the worker's `consumer.group_id`")),
    ("auto.offset.reset", None, Instead::Component("the worker's `consumer.auto_offset_reset`")),
    ("session.timeout.ms", None, Instead::Component("the worker's `consumer.session_timeout_ms`")),
    ("group.instance.id", None, Instead::Component("the worker's `consumer.static_membership` (with `worker.id`)")),
];

/// TLS material framelink cannot take other than as the PEM files of `tls`.
const UNSUPPORTED_TLS: &[(&str, &str)] = &[
    ("ssl.key.password", "encrypted keys are not supported; give an unencrypted key (mode 0600) as `{s}.tls.key`"),
    ("ssl.ca.certificate.stores", "Windows certificate stores are not supported; give the CA as `{s}.tls.ca`"),
    ("ssl.keystore.location", "a PKCS#12 keystore is not supported; give PEM files as `{s}.tls.certificate` and `{s}.tls.key`"),
    ("ssl.keystore.password", "a PKCS#12 keystore is not supported; give PEM files as `{s}.tls.certificate` and `{s}.tls.key`"),
    ("ssl.engine.location", "keys in an OpenSSL engine are not supported; give the key as `{s}.tls.key`"),
    ("ssl.engine.id", "keys in an OpenSSL engine are not supported; give the key as `{s}.tls.key`"),
    ("ssl_engine_callback_data", "keys in an OpenSSL engine are not supported; give the key as `{s}.tls.key`"),
];

/// Authentication other than mTLS and SASL PLAIN/SCRAM (OAUTHBEARER, OIDC, Kerberos): no typed
/// key, so no checks; refused.
const UNSUPPORTED_AUTH_PREFIXES: &[&str] = &["sasl.oauthbearer.", "sasl.kerberos.", "enable.sasl.oauthbearer.", "https."];

/// Properties that can weaken TLS whatever their value; need `allow_insecure`.
const WEAKENING: &[(&str, &str)] = &[
    ("ssl.cipher.suites", "can allow weak or unauthenticated TLS cipher suites"),
    ("ssl.curves.list", "can allow weak key-exchange curves"),
    ("ssl.sigalgs.list", "can allow weak signature algorithms"),
    ("ssl.providers", "can load OpenSSL providers with weak algorithms (e.g. `legacy`)"),
];

/// TLS and SASL properties that pass through (they only add checks).
const TLS_PASSTHROUGH: &[&str] = &["ssl.crl.location"];

/// Why a `librdkafka` property may not pass through as it is.
enum Refusal {
    /// framelink sets it (or what it aliases); `alias_of` is set when `key` is an alias.
    Owned { alias_of: Option<&'static str>, instead: Instead },
    /// No typed key and no pass-through: the reason, with `{s}` for the section.
    Unsupported(String),
    /// Turns off or can weaken TLS verification: what it does.
    Insecure(&'static str),
}

fn check_passthrough(key: &str, value: &str) -> Option<Refusal> {
    if let Some((_, alias_of, instead)) = OWNED.iter().find(|(k, _, _)| *k == key) {
        return Some(Refusal::Owned { alias_of: *alias_of, instead: *instead });
    }
    if let Some((_, why)) = UNSUPPORTED_TLS.iter().find(|(k, _)| *k == key) {
        return Some(Refusal::Unsupported((*why).into()));
    }
    if UNSUPPORTED_AUTH_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return Some(Refusal::Unsupported(
            "framelink authenticates with mTLS (`{s}.tls`) or SASL PLAIN/SCRAM (`{s}.sasl`); OAUTHBEARER, \
             OIDC and Kerberos are not supported"
                .into(),
        ));
    }
    if key == "enable.ssl.certificate.verification" {
        // librdkafka reads `true`, `t` and `1` (any case) as true; anything else is false or
        // an error.
        let on = ["true", "t", "1"].iter().any(|t| value.eq_ignore_ascii_case(t));
        return (!on).then_some(Refusal::Insecure("turns off verification of the brokers' certificates"));
    }
    if let Some((_, why)) = WEAKENING.iter().find(|(k, _)| *k == key) {
        return Some(Refusal::Insecure(why));
    }
    if (key.starts_with("ssl.") || key.starts_with("ssl_") || key.starts_with("sasl.")) && !TLS_PASSTHROUGH.contains(&key) {
        return Some(Refusal::Unsupported(
            "TLS and SASL are configured through `{s}.tls` and `{s}.sasl`; this property has no typed key".into(),
        ));
    }
    None
}

/// Validated settings, ready to configure an rdkafka client.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub brokers: Vec<String>,
    pub security_protocol: SecurityProtocol,
    pub tls: TlsConfig,
    sasl: Option<(SaslMechanism, String, Secret)>,
    pub client_id: Option<String>,
    pub librdkafka: BTreeMap<String, String>,
    /// Settings that weaken security, as `key = value` with what they do; validation warns
    /// about each.
    pub insecure: Vec<String>,
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
            allow_insecure: false,
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
        self.validate_with(section, tls_files::ValidityCheck::Enforce)
    }

    /// As [`validate`](Self::validate), with certificates outside their validity period (by
    /// this machine's clock) only warned about: the edge agent's `run`, which must capture and
    /// spool on a device whose clock is wrong until NTP sets it.
    pub fn validate_with(&self, section: &str, check: tls_files::ValidityCheck) -> Result<KafkaSettings, KafkaConfigError> {
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
            Some(p) => Some(tls_files::load_ca_with(p, check).map_err(file("tls.ca"))?),
            None => None,
        };
        match (&tls.certificate, &tls.key) {
            (Some(cert), Some(key_path)) => {
                let client_ca = match &tls.client_ca {
                    Some(p) => Some((p, tls_files::load_ca_with(p, check).map_err(file("tls.client_ca"))?)),
                    None => tls.ca.as_ref().zip(cas.clone()),
                };
                let issuer = client_ca.as_ref().map(|(p, c)| (p.as_path(), c.as_slice()));
                tls_files::check_client_identity_with(cert, key_path, issuer, check).map_err(|e| {
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

        let mut insecure = Vec::new();
        if tls_used && !tls.verify_hostname {
            insecure.push(format!(
                "{} = false: the brokers' certificates are not checked against the host names connected to",
                key("tls.verify_hostname")
            ));
        }
        for (k, v) in &self.librdkafka {
            let name = format!("librdkafka.\"{k}\"");
            match check_passthrough(k, v) {
                None => {}
                Some(Refusal::Owned { alias_of, instead }) => {
                    let what = match alias_of {
                        Some(canonical) => format!("is an alias of librdkafka's `{canonical}`, which"),
                        None => "is a librdkafka property that".into(),
                    };
                    let reason = match instead {
                        Instead::Key(typed) => format!("{what} framelink sets from its typed settings; set `{}` instead", key(typed)),
                        Instead::Component(typed) => format!("{what} framelink sets from its typed settings; set {typed} instead"),
                        Instead::Fixed(why) => format!("{what} framelink sets itself: {why}"),
                    };
                    return Err(invalid(&name, reason));
                }
                Some(Refusal::Unsupported(why)) => {
                    return Err(invalid(&name, why.replace("{s}", section)));
                }
                Some(Refusal::Insecure(what)) => {
                    if !self.allow_insecure {
                        return Err(invalid(
                            &name,
                            format!(
                                "{what}; refused unless `{}` is true (and then warned about at every start)",
                                key("allow_insecure")
                            ),
                        ));
                    }
                    insecure.push(format!("{} = {v:?}: {what}", key(&name)));
                }
            }
        }
        for setting in &insecure {
            tracing::warn!("Insecure Kafka setting: {setting}.");
        }

        Ok(KafkaSettings {
            brokers: self.brokers.clone(),
            security_protocol: self.security_protocol,
            tls: tls.clone(),
            sasl,
            client_id: self.client_id.clone(),
            librdkafka: self.librdkafka.clone(),
            insecure,
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
pub(crate) fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
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

    fn with_passthrough(extra: &str, key: &str, value: &str) -> KafkaConfig {
        parse(&format!("brokers = \"h:1\"\nsecurity_protocol = \"SSL\"\n{extra}[librdkafka]\n{key:?} = {value:?}")).unwrap()
    }

    /// librdkafka aliases of keys framelink sets (and auth settings it has no typed key for)
    /// are refused, naming the key to use instead: through an alias the pass-through value would
    /// win or lose against framelink's depending on the order librdkafka applies them.
    #[test]
    fn passthrough_refuses_aliases_and_untyped_auth_settings() {
        let mut wrong = Vec::new();
        for (k, instead) in [
            ("delivery.timeout.ms", "forwarder.message_timeout_ms"),
            ("message.timeout.ms", "forwarder.message_timeout_ms"),
            ("request.required.acks", "acks=all"),
            ("acks", "acks=all"),
            ("enable.idempotence", "always idempotent"),
            ("queue.buffering.max.ms", "forwarder.linger_ms"),
            ("linger.ms", "forwarder.linger_ms"),
            ("queue.buffering.max.kbytes", "forwarder.queue_max_bytes"),
            ("transactional.id", "worker.delivery"),
            ("isolation.level", "worker.delivery"),
            ("enable.auto.commit", "worker.delivery"),
            ("group.id", "consumer.group_id"),
            ("metadata.broker.list", "kafka.brokers"),
            ("bootstrap.servers", "kafka.brokers"),
            ("sasl.mechanism", "kafka.sasl.mechanism"),
            ("sasl.mechanisms", "kafka.sasl.mechanism"),
            ("ssl.endpoint.identification.algorithm", "kafka.tls.verify_hostname"),
            ("ssl_key", "kafka.tls.key"),
            ("ssl.key.pem", "kafka.tls.key"),
            ("ssl.certificate.pem", "kafka.tls.certificate"),
            ("ssl.keystore.location", "kafka.tls.key"),
            ("ssl.keystore.password", "kafka.tls.key"),
            ("ssl.key.password", "unencrypted key"),
            ("ssl.engine.id", "kafka.tls.key"),
            ("ssl.ca.certificate.stores", "kafka.tls.ca"),
            ("sasl.oauthbearer.client.secret", "kafka.sasl"),
            ("sasl.oauthbearer.method", "kafka.sasl"),
            ("enable.sasl.oauthbearer.unsecure.jwt", "kafka.sasl"),
            ("sasl.kerberos.kinit.cmd", "kafka.sasl"),
            ("https.ca.location", "kafka.sasl"),
        ] {
            match with_passthrough("", k, "1").validate("kafka") {
                Ok(_) => wrong.push(format!("{k}: accepted")),
                Err(e) => {
                    let named = matches!(&e, KafkaConfigError::Invalid { key, .. } if *key == format!("kafka.librdkafka.\"{k}\""));
                    if !named || !e.to_string().contains(instead) {
                        wrong.push(format!("{k}: does not name {instead:?}: {e}"));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        let e = with_passthrough("", "delivery.timeout.ms", "1").validate("kafka").unwrap_err().to_string();
        assert!(e.contains("alias of librdkafka's `message.timeout.ms`") && e.contains("typed"), "{e}");
        let e = with_passthrough("", "acks", "1").validate("kafka").unwrap_err().to_string();
        assert!(e.contains("alias of librdkafka's `request.required.acks`") && e.contains("acks=all"), "{e}");
        let e = with_passthrough("", "ssl.ca.pem", "x").validate("kafka").unwrap_err().to_string();
        assert!(!e.contains("alias") && e.contains("`kafka.tls.ca`"), "{e}");
        // Tuning that framelink leaves alone still passes through.
        for k in ["batch.num.messages", "max.in.flight", "topic.metadata.refresh.interval.ms", "ssl.crl.location"] {
            let s = with_passthrough("", k, "5").validate("kafka").unwrap();
            assert_eq!(s.client_config("t").get(k), Some("5"));
        }
    }

    /// Settings that turn off or can weaken TLS verification need `allow_insecure = true`, and
    /// then every start warns, naming each of them.
    #[test]
    fn insecure_passthrough_needs_allow_insecure_and_warns() {
        for (k, v) in [
            ("enable.ssl.certificate.verification", "false"),
            ("enable.ssl.certificate.verification", "0"),
            ("enable.ssl.certificate.verification", "F"),
            ("ssl.cipher.suites", "aNULL"),
            ("ssl.providers", "legacy"),
        ] {
            let e = with_passthrough("", k, v).validate("kafka").unwrap_err();
            assert!(matches!(&e, KafkaConfigError::Invalid { key, .. } if *key == format!("kafka.librdkafka.\"{k}\"")), "{e}");
            assert!(e.to_string().contains("kafka.allow_insecure"), "{e}");
        }
        // Turning verification explicitly on is harmless.
        let (s, log) = crate::testlog::capture(|| with_passthrough("", "enable.ssl.certificate.verification", "true").validate("kafka"));
        s.unwrap();
        assert!(!log.contains("WARN"), "{log}");

        let cfg = with_passthrough("allow_insecure = true\n", "enable.ssl.certificate.verification", "false");
        let (s, log) = crate::testlog::capture(|| cfg.validate("kafka"));
        let s = s.unwrap();
        assert_eq!(s.client_config("t").get("enable.ssl.certificate.verification"), Some("false"));
        assert!(log.contains("WARN") && log.contains("kafka.librdkafka.\"enable.ssl.certificate.verification\" = \"false\""), "{log}");
        // allow_insecure does not open the keys framelink owns.
        let e = with_passthrough("allow_insecure = true\n", "ssl.endpoint.identification.algorithm", "none").validate("kafka").unwrap_err();
        assert!(e.to_string().contains("kafka.tls.verify_hostname"), "{e}");
    }

    /// With no `[tls]` table (system CA store, no client certificate) hostnames are checked
    /// all the same: the default of `tls.verify_hostname` does not depend on the table being
    /// written.
    #[test]
    fn ssl_without_a_tls_table_verifies_hostnames() {
        for protocol in ["SSL", "SASL_SSL"] {
            let sasl = if protocol == "SASL_SSL" { "[sasl]\nmechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"p\"\n" } else { "" };
            let cfg = parse(&format!("brokers = \"h:1\"\nsecurity_protocol = \"{protocol}\"\n{sasl}")).unwrap();
            assert!(cfg.tls.verify_hostname, "{protocol}");
            let c = cfg.validate("kafka").unwrap().client_config("t");
            assert_eq!(c.get("ssl.endpoint.identification.algorithm"), Some("https"), "{protocol}");
        }
    }

    #[test]
    fn hostname_verification_off_is_warned() {
        let cfg = parse("brokers = \"h:1\"\nsecurity_protocol = \"SSL\"\n[tls]\nverify_hostname = false").unwrap();
        let (s, log) = crate::testlog::capture(|| cfg.validate("kafka"));
        assert_eq!(s.unwrap().client_config("t").get("ssl.endpoint.identification.algorithm"), Some("none"));
        assert!(log.contains("WARN") && log.contains("kafka.tls.verify_hostname = false"), "{log}");
    }
}
