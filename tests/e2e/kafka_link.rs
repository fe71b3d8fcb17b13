//! framelink records over a real Kafka broker: PLAINTEXT and mutual TLS round trips with the
//! wire contract's headers, and the refusals a misconfigured device must see clearly.

use std::collections::BTreeMap;
use std::time::Duration;

use framelink_common::link::{LinkErrorKind, check_connection};
use framelink_common::wire::header;
use framelink_common::{FrameMeta, KafkaConfig};
use framelink_testkit::*;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

/// Produces frames from two cameras, reads them back and checks key, headers, payload and
/// per-camera order.
async fn round_trip(cfg: KafkaConfig, what: &str) {
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic(what);
    broker.create_topic(&topic, 3).await.unwrap();
    let producer = Producer::new(&cfg).unwrap();
    let mut sent = Vec::new();
    for seq in 0..30u64 {
        let camera = if seq % 2 == 0 { "cam0" } else { "cam1" };
        let meta = test_meta("dev-a", camera, seq / 2);
        let payload = format!("jpeg bytes of {camera} #{}", seq / 2).into_bytes();
        producer.send_frame(&topic, &meta, &payload).await.unwrap();
        sent.push((meta, payload));
    }
    let got = consume(&cfg, &topic, sent.len(), Duration::from_secs(30)).await.unwrap();
    let mut by_camera: BTreeMap<String, Vec<(FrameMeta, Vec<u8>)>> = BTreeMap::new();
    let mut partition_of = BTreeMap::new();
    for m in &got {
        let meta = frame_meta(m).unwrap();
        // One camera, one partition: that is what keeps its frames in order.
        let p = *partition_of.entry(meta.key()).or_insert(m.partition());
        assert_eq!(p, m.partition(), "{} moved partitions", meta.key());
        by_camera.entry(meta.camera_id.clone()).or_default().push((meta, m.payload().unwrap().to_vec()));
    }
    for camera in ["cam0", "cam1"] {
        let expected: Vec<_> = sent.iter().filter(|(m, _)| m.camera_id == camera).cloned().collect();
        assert_eq!(by_camera[camera], expected, "{camera}: frames differ or are out of order");
    }
    assert_eq!(got.len(), 30, "no duplicates");
}

#[tokio::test]
async fn frames_round_trip_over_plaintext() {
    round_trip(Broker::shared().plaintext(), "plain").await;
}

#[tokio::test]
async fn frames_round_trip_over_mtls() {
    round_trip(Broker::shared().mtls(), "mtls").await;
}

#[tokio::test]
async fn records_are_readable_by_any_client_and_malformed_headers_are_named() {
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("contract");
    broker.create_topic(&topic, 1).await.unwrap();
    let producer = Producer::new(&broker.plaintext()).unwrap();
    let meta = test_meta("dev-b", "cam9", 7);
    producer.send_frame(&topic, &meta, b"\xff\xd8jpeg").await.unwrap();
    // A record whose sequence header is not a number, as a buggy producer might send.
    let mut bad = OwnedHeaders::new();
    for (k, v) in meta.to_header_pairs() {
        let v = if k == header::SEQ { "seven".to_string() } else { v };
        bad = bad.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    producer.send_raw(&topic, Some(b"dev-b/cam9"), Some(b"x"), Some(bad)).await.unwrap();

    let got = consume(&broker.plaintext(), &topic, 2, Duration::from_secs(30)).await.unwrap();
    // Plain text headers: any Kafka client sees the contract without framelink code.
    let raw: BTreeMap<String, String> = got[0]
        .headers()
        .unwrap()
        .iter()
        .map(|h| (h.key.to_string(), String::from_utf8(h.value.unwrap().to_vec()).unwrap()))
        .collect();
    assert_eq!(raw["framelink-seq"], "7");
    assert_eq!(raw["framelink-device"], "dev-b");
    assert_eq!(raw["content-type"], "image/jpeg");
    assert_eq!(got[0].key(), Some(&b"dev-b/cam9"[..]));
    assert_eq!(got[0].payload(), Some(&b"\xff\xd8jpeg"[..]));
    let err = frame_meta(&got[1]).unwrap_err().to_string();
    assert!(err.contains("framelink-seq") && err.contains("seven"), "{err}");
}

#[test]
fn connection_check_succeeds_on_both_listeners() {
    init_tracing();
    let broker = Broker::shared();
    for cfg in [broker.plaintext(), broker.mtls()] {
        let settings = cfg.validate("kafka").unwrap();
        let summary = check_connection(&settings, Duration::from_secs(20)).unwrap();
        assert_eq!(summary.brokers, 1);
    }
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused_as_a_tls_error() {
    init_tracing();
    let broker = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    let (rogue_ca, rogue_cert, rogue_key) = rogue_identity(dir.path()).unwrap();
    // The device trusts the real broker CA but presents a certificate from a CA the broker does
    // not trust (declared as `client_ca`, so the offline check passes and the broker decides).
    let mut cfg = broker.mtls();
    cfg.tls.certificate = Some(rogue_cert);
    cfg.tls.key = Some(rogue_key);
    cfg.tls.client_ca = Some(rogue_ca.clone());
    let settings = cfg.validate("kafka").expect("offline checks pass: the cert matches its own CA");

    let err = check_connection(&settings, Duration::from_secs(15)).unwrap_err();
    let diagnosis = err.diagnosis.clone().expect("a broker error was reported, not a bare timeout");
    assert_eq!(diagnosis.kind, LinkErrorKind::Tls, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("TLS handshake / certificate error"), "{msg}");
    assert!(msg.contains(&broker.bootstrap_tls), "names the broker: {msg}");

    // Producing fails the same way: the error says TLS, not just "timed out".
    let producer = Producer::new(&cfg).unwrap();
    let topic = rand_topic("refused");
    let e = tokio::time::timeout(
        Duration::from_secs(60),
        producer.send_frame(&topic, &test_meta("d", "c", 0), b"x"),
    )
    .await
    .expect("delivery gives up within message.timeout.ms")
    .unwrap_err()
    .to_string();
    assert!(e.contains("TLS handshake / certificate error"), "{e}");

    // Without the `client_ca` escape hatch the same identity is refused before connecting.
    cfg.tls.client_ca = None;
    let offline = cfg.validate("kafka").unwrap_err().to_string();
    assert!(offline.contains("kafka.tls.certificate") && offline.contains("not signed by the CA"), "{offline}");
}

#[test]
fn broker_certificate_from_an_untrusted_ca_is_a_tls_error() {
    init_tracing();
    let broker = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    let (rogue_ca, _, _) = rogue_identity(dir.path()).unwrap();
    let mut cfg = broker.mtls();
    cfg.tls.ca = Some(rogue_ca);
    cfg.tls.client_ca = Some(broker.tls_dir.join("ca.pem"));
    let settings = cfg.validate("kafka").unwrap();
    let err = check_connection(&settings, Duration::from_secs(15)).unwrap_err();
    assert_eq!(err.diagnosis.as_ref().map(|d| d.kind), Some(LinkErrorKind::Tls), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[test]
fn plaintext_client_on_the_tls_listener_is_not_a_bare_timeout() {
    init_tracing();
    let broker = Broker::shared();
    let settings = KafkaConfig::plaintext(broker.bootstrap_tls.clone()).validate("kafka").unwrap();
    let err = check_connection(&settings, Duration::from_secs(10)).unwrap_err();
    assert_eq!(err.diagnosis.as_ref().map(|d| d.kind), Some(LinkErrorKind::Protocol), "{err}");
    assert!(err.to_string().contains("security_protocol"), "{err}");
}
