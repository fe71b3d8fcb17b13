//! What librdkafka says about the link to the brokers, kept so users see the real cause.
//!
//! librdkafka retries connections forever and reports failures only through its error
//! callback; a produce or metadata call just times out. A device whose client certificate the
//! broker refuses would otherwise log "timed out" forever. [`LinkContext`] is the rdkafka client
//! context both halves use: it forwards librdkafka's logs to `tracing`, and classifies each
//! broker error (TLS / authentication / unreachable) into [`LinkStatus`], which
//! [`check_connection`] and the components' health endpoints report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rdkafka::client::ClientContext;
use rdkafka::producer::Producer;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{ProducerContext, ThreadedProducer};
use rdkafka::message::DeliveryResult;

use crate::kafka_config::KafkaSettings;

/// The kind of a link failure, most specific first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkErrorKind {
    /// TLS handshake or certificate problem (wrong CA, refused client certificate, ...).
    Tls,
    /// SASL authentication failed.
    Authentication,
    /// The broker hung up on the first request: the client's `security_protocol` does not match
    /// the listener (e.g. PLAINTEXT to a TLS port).
    Protocol,
    /// Brokers could not be reached (refused, unresolvable, timed out, disconnected).
    Unreachable,
    /// Anything else librdkafka reported.
    Other,
}

impl LinkErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Authentication => "authentication",
            Self::Protocol => "protocol",
            Self::Unreachable => "unreachable",
            Self::Other => "other",
        }
    }
}

/// One classified error from librdkafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkError {
    pub kind: LinkErrorKind,
    pub message: String,
    pub at: SystemTime,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            LinkErrorKind::Tls => "TLS handshake / certificate error",
            LinkErrorKind::Authentication => "SASL authentication failed",
            LinkErrorKind::Protocol => {
                "the broker closed the connection on the first request; check that \
                 `security_protocol` matches this listener (PLAINTEXT sent to a TLS port?)"
            }
            LinkErrorKind::Unreachable => "broker unreachable",
            LinkErrorKind::Other => "Kafka client error",
        };
        write!(f, "{what}: {}", self.message)
    }
}

/// Classifies a librdkafka error by its code and text.
pub fn classify(error: &KafkaError, reason: &str) -> LinkErrorKind {
    let code = error.rdkafka_error_code();
    if code == Some(RDKafkaErrorCode::SSL) {
        return LinkErrorKind::Tls;
    }
    if code == Some(RDKafkaErrorCode::Authentication) {
        return LinkErrorKind::Authentication;
    }
    match classify_text(reason) {
        LinkErrorKind::Other
            if matches!(
                code,
                Some(RDKafkaErrorCode::BrokerTransportFailure)
                    | Some(RDKafkaErrorCode::AllBrokersDown)
                    | Some(RDKafkaErrorCode::Resolve)
                    | Some(RDKafkaErrorCode::OperationTimedOut)
            ) =>
        {
            LinkErrorKind::Unreachable
        }
        kind => kind,
    }
}

/// Classifies a librdkafka error or log line by its text alone.
pub fn classify_text(reason: &str) -> LinkErrorKind {
    // Broker names start with `ssl://` on SSL connections: skip them before looking for TLS words.
    let text = reason.to_ascii_lowercase().replace("ssl://", "").replace("sasl_ssl://", "");
    let any = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if any(&["handshake", "certificate", "ssl routines", "ssl transport", "ssl alert", "tls alert", "ssl error"]) {
        LinkErrorKind::Tls
    } else if any(&["sasl", "authentication"]) {
        LinkErrorKind::Authentication
    } else if text.contains("in state apiversion_query") && any(&["disconnected", "closed by peer"]) {
        LinkErrorKind::Protocol
    } else if any(&["connection refused", "connect to", "disconnected", "timed out", "resolve", "brokers are down"]) {
        LinkErrorKind::Unreachable
    } else {
        LinkErrorKind::Other
    }
}

/// A connection that ended (reset, closed, refused) rather than a certificate refused: what a
/// broker dying mid-handshake looks like.
fn is_disconnect(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["disconnected", "reset by peer", "connection refused", "closed by peer"].iter().any(|w| m.contains(w))
        && !["certificate", "alert", "verify", "unknown ca"].iter().any(|w| m.contains(w))
}

/// The most recent link errors, shared between the client context and whoever reports health.
#[derive(Debug, Default)]
pub struct LinkStatus {
    recent: Mutex<Vec<LinkError>>,
    /// librdkafka's last "all brokers are down" (kept apart: a single broker's refused
    /// connection, recorded as `Unreachable` too, replaces it in `recent`).
    all_down: Mutex<Option<LinkError>>,
    /// When librdkafka last took a partition's leader to be a broker it does not know (leader
    /// -1 in a metadata response: the partition has no leader at that moment).
    leaderless: Mutex<Option<SystemTime>>,
}

impl LinkStatus {
    /// How long an error stays relevant to [`LinkStatus::diagnosis`].
    pub const RECENT: Duration = Duration::from_secs(300);

    pub fn record(&self, kind: LinkErrorKind, message: impl Into<String>) {
        let e = LinkError {
            kind,
            message: message.into(),
            at: SystemTime::now(),
        };
        let mut recent = self.recent.lock().expect("link status lock");
        recent.retain(|x| x.kind != kind);
        recent.push(e);
    }

    /// librdkafka reported every broker it knows down (`_ALL_BROKERS_DOWN`).
    pub fn record_all_down(&self, message: impl Into<String>) {
        let e = LinkError { kind: LinkErrorKind::Unreachable, message: message.into(), at: SystemTime::now() };
        *self.all_down.lock().expect("link status lock") = Some(e.clone());
        let mut recent = self.recent.lock().expect("link status lock");
        recent.retain(|x| x.kind != e.kind);
        recent.push(e);
    }

    /// librdkafka logged that a partition's new leader is not a broker it knows.
    pub fn record_leaderless(&self) {
        *self.leaderless.lock().expect("link status lock") = Some(SystemTime::now());
    }

    /// The last time a partition was seen without a leader (see [`LinkStatus::record_leaderless`]).
    /// librdkafka 2.12 can keep such a partition without a leader for good
    /// (confluentinc/librdkafka#5430): every record for it then times out.
    pub fn leaderless(&self) -> Option<SystemTime> {
        *self.leaderless.lock().expect("link status lock")
    }

    /// Forgets past errors (call when the link is known to work again).
    pub fn clear(&self) {
        self.recent.lock().expect("link status lock").clear();
        *self.all_down.lock().expect("link status lock") = None;
    }

    /// The most specific recent error that concerns the whole link rather than one broker:
    /// a certificate or authentication failure, or librdkafka's "all brokers are down"
    /// (reported with the most specific recent error as its message, so a protocol mismatch
    /// still reads as one). A single broker's refused connection, or one that dies during the
    /// TLS handshake or the first request (which reads like a TLS or protocol error), is not
    /// one: a replicated cluster serves on without that broker, and frames that really wait
    /// are caught by their missing acknowledgements instead.
    pub fn outage(&self) -> Option<LinkError> {
        let now = SystemTime::now();
        let fresh = |e: &LinkError| now.duration_since(e.at).map(|d| d < Self::RECENT).unwrap_or(true);
        let recent = self.recent.lock().expect("link status lock");
        let wide = recent.iter().filter(|e| fresh(e)).filter(|e| match e.kind {
            LinkErrorKind::Authentication => true,
            LinkErrorKind::Tls => !is_disconnect(&e.message),
            _ => false,
        });
        if let Some(e) = wide.min_by_key(|e| e.kind) {
            return Some(e.clone());
        }
        let all_down = self.all_down.lock().expect("link status lock").clone().filter(fresh)?;
        let specific = recent.iter().filter(|e| fresh(e)).min_by_key(|e| e.kind).cloned().unwrap_or_else(|| all_down.clone());
        Some(LinkError { at: all_down.at, ..specific })
    }

    /// The most specific recent error: a TLS error explains an "all brokers down" that follows it.
    pub fn diagnosis(&self) -> Option<LinkError> {
        let now = SystemTime::now();
        let recent = self.recent.lock().expect("link status lock");
        recent
            .iter()
            .filter(|e| now.duration_since(e.at).map(|d| d < Self::RECENT).unwrap_or(true))
            .min_by_key(|e| e.kind)
            .cloned()
    }
}

/// rdkafka client context: logs through `tracing` and records link errors.
#[derive(Clone, Default)]
pub struct LinkContext {
    pub status: Arc<LinkStatus>,
}

impl LinkContext {
    pub fn new(status: Arc<LinkStatus>) -> Self {
        Self { status }
    }
}

impl ClientContext for LinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
        // Connection failures are often only logged (facility FAIL), not raised as errors.
        if fac == "FAIL" {
            self.status.record(classify_text(log_message), log_message);
        }
        // "Partition t(id)[0]: new leader-1 not found in cache" (librdkafka 2.12): the partition
        // lost its leader (a broker fenced, a leader election); see `LinkStatus::leaderless`.
        if fac == "METADATAUPDATE" && log_message.contains("new leader-1 not found in cache") {
            self.status.record_leaderless();
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = classify(&error, reason);
        tracing::warn!(kind = kind.as_str(), error = %error, "Kafka link error: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.record_all_down(reason);
        } else {
            self.status.record(kind, reason);
        }
    }
}

/// rdkafka, for [`impl_link_client_context!`](crate::impl_link_client_context) in crates
/// that name it differently.
#[doc(hidden)]
pub use rdkafka;

/// Implements `rdkafka::ClientContext` for a context type that holds a [`LinkContext`] (or any
/// client context) in the field `$field`: `log` and `error` go to it, so every client's logs
/// and link errors reach the same diagnosis. A context with a producer or consumer role of its
/// own (delivery reports, rebalances) cannot simply be a `LinkContext`; this is the one way it
/// delegates. Further `ClientContext` methods, such as `stats`, go in braces after the field:
///
/// ```ignore
/// framelink_common::impl_link_client_context!(ConsumeContext, link, {
///     fn stats(&self, stats: rdkafka::statistics::Statistics) { /* ... */ }
/// });
/// ```
#[macro_export]
macro_rules! impl_link_client_context {
    ($ty:ty, $field:ident) => {
        $crate::impl_link_client_context!($ty, $field, {});
    };
    ($ty:ty, $field:ident, { $($extra:tt)* }) => {
        impl $crate::link::rdkafka::ClientContext for $ty {
            fn log(&self, level: $crate::link::rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
                $crate::link::rdkafka::ClientContext::log(&self.$field, level, fac, log_message)
            }
            fn error(&self, error: $crate::link::rdkafka::error::KafkaError, reason: &str) {
                $crate::link::rdkafka::ClientContext::error(&self.$field, error, reason)
            }
            $($extra)*
        }
    };
}

impl ProducerContext for LinkContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _result: &DeliveryResult<'_>, _opaque: Self::DeliveryOpaque) {}
}

impl ConsumerContext for LinkContext {}

/// Why [`check_connection`] failed: the client's own error, plus what the link reported.
#[derive(Debug, thiserror::Error)]
#[error("cannot talk to Kafka at {brokers}: {}", match diagnosis {
    Some(d) => d.to_string(),
    None => format!("{error} (no broker error reported)"),
})]
pub struct ConnectError {
    pub brokers: String,
    pub error: KafkaError,
    pub diagnosis: Option<LinkError>,
}

/// What a successful [`check_connection`] saw.
#[derive(Debug, Clone)]
pub struct ClusterSummary {
    pub brokers: usize,
    pub topics: usize,
}

/// Asks the cluster for metadata; on failure the error says why (TLS, auth, unreachable).
pub fn check_connection(settings: &KafkaSettings, timeout: Duration) -> Result<ClusterSummary, ConnectError> {
    let status = Arc::new(LinkStatus::default());
    let mut cfg = settings.client_config("framelink-check");
    cfg.set("reconnect.backoff.max.ms", "1000");
    let to_err = |error: KafkaError, status: &LinkStatus| ConnectError {
        brokers: settings.brokers.join(","),
        error,
        diagnosis: status.diagnosis(),
    };
    // A threaded producer polls librdkafka's main queue, so error callbacks arrive while we wait.
    let producer: ThreadedProducer<LinkContext> = cfg
        .create_with_context(LinkContext::new(status.clone()))
        .map_err(|e| to_err(e, &status))?;
    let md = producer.client().fetch_metadata(None, timeout).map_err(|e| {
        // The failure can be faster than the log/error events that explain it: give the
        // polling thread a moment to deliver them.
        for _ in 0..20 {
            if status.diagnosis().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        to_err(e, &status)
    })?;
    Ok(ClusterSummary {
        brokers: md.brokers().len(),
        topics: md.topics().len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Wrapped {
        link: LinkContext,
        stats_seen: Mutex<u32>,
    }
    crate::impl_link_client_context!(Wrapped, link, {
        fn stats(&self, _stats: rdkafka::statistics::Statistics) {
            *self.stats_seen.lock().unwrap() += 1;
        }
    });
    struct Plain {
        inner: LinkContext,
    }
    crate::impl_link_client_context!(Plain, inner);

    #[test]
    fn a_partition_without_a_leader_is_recorded_from_librdkafkas_log() {
        let c = LinkContext::default();
        c.log(RDKafkaLogLevel::Warning, "METADATAUPDATE", "Partition other(x)[0]: leader 1 unchanged");
        // A leader the client does not know yet is a leader, not a missing one.
        c.log(RDKafkaLogLevel::Warning, "METADATAUPDATE", "Partition other(x)[0]: new leader2 not found in cache");
        assert_eq!(c.status.leaderless(), None);
        // The line librdkafka 2.12.1 logged when a paused broker came back fenced.
        c.log(RDKafkaLogLevel::Warning, "METADATAUPDATE", "[thrd:main]: Partition bench-ab-1ae2e940(6MAVsf5JT72CXdTZr42qIw)[0]: new leader-1 not found in cache");
        assert!(c.status.leaderless().is_some());
        assert!(c.status.diagnosis().is_none(), "not an error of the link by itself");
    }

    #[test]
    fn a_wrapping_context_reports_to_its_link() {
        let w = Wrapped { link: LinkContext::default(), stats_seen: Mutex::new(0) };
        w.error(KafkaError::Global(RDKafkaErrorCode::SSL), "handshake failed");
        assert_eq!(w.link.status.diagnosis().map(|d| d.kind), Some(LinkErrorKind::Tls));
        w.stats(rdkafka::statistics::Statistics::default());
        assert_eq!(*w.stats_seen.lock().unwrap(), 1);
        let p = Plain { inner: LinkContext::default() };
        p.log(RDKafkaLogLevel::Error, "FAIL", "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused");
        assert!(p.inner.status.diagnosis().is_some());
    }

    #[test]
    fn classification() {
        let transport = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(
            classify(&transport, "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: certificate verify failed"),
            LinkErrorKind::Tls
        );
        assert_eq!(classify(&KafkaError::Global(RDKafkaErrorCode::SSL), "x"), LinkErrorKind::Tls);
        assert_eq!(
            classify(&transport, "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused"),
            LinkErrorKind::Unreachable
        );
        assert_eq!(
            classify(&KafkaError::Global(RDKafkaErrorCode::Authentication), "SASL authentication error"),
            LinkErrorKind::Authentication
        );
        assert_eq!(classify(&KafkaError::Global(RDKafkaErrorCode::Fail), "weird"), LinkErrorKind::Other);
        // The `ssl://` in a broker name is not a TLS error.
        assert_eq!(
            classify(&transport, "ssl://10.0.0.1:9093/bootstrap: Connect to ipv4#10.0.0.1:9093 failed: Connection refused"),
            LinkErrorKind::Unreachable
        );
        assert_eq!(
            classify_text("ssl://h:9093/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls alert bad certificate"),
            LinkErrorKind::Tls
        );
        assert_eq!(
            classify_text("h:9093/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 1ms in state APIVERSION_QUERY)"),
            LinkErrorKind::Protocol
        );
    }

    #[test]
    fn one_broker_refusing_is_not_an_outage_but_all_brokers_down_is() {
        let ctx = LinkContext::default();
        ctx.log(RDKafkaLogLevel::Error, "FAIL", "127.0.0.1:19212/3: Connect to ipv4#127.0.0.1:19212 failed: Connection refused");
        assert_eq!(ctx.status.diagnosis().map(|d| d.kind), Some(LinkErrorKind::Unreachable), "still the diagnosis users see");
        assert!(ctx.status.outage().is_none(), "one broker of several");
        ctx.error(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "3/3 brokers are down");
        let all_down = ctx.status.outage().expect("all brokers down is an outage");
        assert_eq!(all_down.message, "3/3 brokers are down");
        // A later refused connection tells it (the most specific recent error), dated by the
        // all-down report.
        ctx.log(RDKafkaLogLevel::Error, "FAIL", "127.0.0.1:19192/1: Connect to ipv4#127.0.0.1:19192 failed: Connection refused");
        let o = ctx.status.outage().unwrap();
        assert_eq!((o.kind, o.at), (LinkErrorKind::Unreachable, all_down.at));
        assert!(o.message.contains("Connection refused"), "{o:?}");
        ctx.error(KafkaError::Global(RDKafkaErrorCode::SSL), "ssl://h:9093/2: SSL handshake failed: Disconnected: connection reset by peer: connecting to a PLAINTEXT broker listener? (after 2ms in state SSL_HANDSHAKE)");
        let o = ctx.status.outage().unwrap();
        assert_eq!((o.kind, o.message.contains("PLAINTEXT broker listener")), (LinkErrorKind::Tls, true), "all down, told by the specific cause");
        ctx.status.clear();
        ctx.error(KafkaError::Global(RDKafkaErrorCode::SSL), "ssl://h:9093/2: SSL handshake failed: Disconnected: connection reset by peer (after 2ms in state SSL_HANDSHAKE)");
        assert!(ctx.status.outage().is_none(), "one broker dying mid-handshake is not an outage");
        ctx.error(KafkaError::Global(RDKafkaErrorCode::SSL), "ssl://h:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed");
        assert_eq!(ctx.status.outage().map(|d| d.kind), Some(LinkErrorKind::Tls), "a refused certificate is");
        ctx.status.clear();
        assert!(ctx.status.outage().is_none());
    }

    #[test]
    fn diagnosis_prefers_the_specific_cause() {
        let s = LinkStatus::default();
        assert!(s.diagnosis().is_none());
        s.record(LinkErrorKind::Tls, "SSL handshake failed");
        s.record(LinkErrorKind::Unreachable, "1/1 brokers are down");
        let d = s.diagnosis().unwrap();
        assert_eq!(d.kind, LinkErrorKind::Tls);
        assert!(d.to_string().starts_with("TLS handshake / certificate error"));
        s.clear();
        assert!(s.diagnosis().is_none());
    }
}
