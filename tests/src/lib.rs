//! Test support for framelink's end-to-end tests: a real Apache Kafka broker, fresh topics,
//! produce / consume helpers, and broker outages on demand.
//!
//! - [`Broker::shared`] starts (or reuses) the project's broker via `scripts/kafka up`, the one
//!   the README and CI use. Tests on it must not stop it.
//! - [`Broker::private`] starts a broker of the test's own (own directory, own ports) that the
//!   test may stop, kill and restart to simulate network loss and broker crashes without
//!   disturbing tests running beside it. It is stopped and wiped when dropped.
//! - [`rand_topic`] + [`Broker::create_topic`]: a fresh topic per test, with N partitions.
//! - [`Producer`] / [`consume`]: produce framelink records and read them back, over PLAINTEXT
//!   or mTLS, through the same [`framelink_common`] settings the components use.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use framelink_common::link::{LinkContext, LinkStatus};
use framelink_common::{FrameMeta, KafkaConfig, KafkaSettings};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rand::RngExt;

pub mod cluster;
pub mod daemon;
pub mod inference;
pub mod latency;
pub mod netfault;
pub mod smallfs;

pub use cluster::Cluster;

/// The repository root (where `scripts/kafka` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A running Kafka broker started by `scripts/kafka`.
#[derive(Debug)]
pub struct Broker {
    /// PLAINTEXT `host:port`.
    pub bootstrap: String,
    /// mTLS `host:port`.
    pub bootstrap_tls: String,
    /// Holds `ca.pem`, `client.pem`, `client.key`.
    pub tls_dir: PathBuf,
    /// `FRAMELINK_KAFKA_DIR` for a private broker; `None` for the shared one.
    private_dir: Option<tempfile::TempDir>,
    port: u16,
    /// Kafka's default record limits (1 MiB) instead of the project's 16 MiB.
    default_limits: bool,
}

static SHARED: OnceLock<Broker> = OnceLock::new();

impl Broker {
    /// The project's broker (`scripts/kafka up`), started on first use and left running.
    pub fn shared() -> &'static Broker {
        SHARED.get_or_init(|| {
            let b = Broker {
                bootstrap: String::new(),
                bootstrap_tls: String::new(),
                tls_dir: PathBuf::new(),
                private_dir: None,
                default_limits: false,
                port: std::env::var("FRAMELINK_KAFKA_PORT")
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(19092),
            };
            b.script("up").expect("scripts/kafka up (the shared broker) failed");
            b.with_env().expect("scripts/kafka env")
        })
    }

    /// A broker of this test's own, on free ports, in a temporary directory.
    pub fn private() -> Result<Broker> {
        Self::private_with(false)
    }

    /// A private broker with Kafka's default record limits (`message.max.bytes` 1 MiB), as
    /// users' clusters have unless they raise them: what such a cluster refuses, tests see.
    pub fn private_default_limits() -> Result<Broker> {
        Self::private_with(true)
    }

    fn private_with(default_limits: bool) -> Result<Broker> {
        let dir = tempfile::Builder::new().prefix("framelink-kafka-").tempdir()?;
        let b = Broker {
            bootstrap: String::new(),
            bootstrap_tls: String::new(),
            tls_dir: PathBuf::new(),
            private_dir: Some(dir),
            default_limits,
            port: free_port_triple()?,
        };
        b.script("up")?;
        b.with_env()
    }

    fn with_env(mut self) -> Result<Broker> {
        let out = self.script_output("env")?;
        let vars: HashMap<_, _> = out.lines().filter_map(|l| l.split_once('=')).collect();
        self.bootstrap = vars.get("FRAMELINK_BOOTSTRAP").context("FRAMELINK_BOOTSTRAP")?.to_string();
        self.bootstrap_tls = vars.get("FRAMELINK_BOOTSTRAP_TLS").context("FRAMELINK_BOOTSTRAP_TLS")?.to_string();
        self.tls_dir = PathBuf::from(vars.get("FRAMELINK_TLS_DIR").context("FRAMELINK_TLS_DIR")?);
        Ok(self)
    }

    fn command(&self, verb: &str) -> Command {
        let mut c = Command::new(repo_root().join("scripts/kafka"));
        c.arg(verb).env("FRAMELINK_KAFKA_PORT", self.port.to_string());
        c.env("FRAMELINK_KAFKA_LIMITS", if self.default_limits { "default" } else { "frames" });
        if let Some(dir) = &self.private_dir {
            // Private brokers are small: the shared broker keeps the default heap.
            c.env("FRAMELINK_KAFKA_DIR", dir.path()).env("FRAMELINK_KAFKA_HEAP", "-Xms128m -Xmx384m");
        }
        c
    }

    fn script(&self, verb: &str) -> Result<()> {
        let status = self.command(verb).status().with_context(|| format!("running scripts/kafka {verb}"))?;
        if !status.success() {
            bail!("scripts/kafka {verb} failed: {status}");
        }
        Ok(())
    }

    fn script_output(&self, verb: &str) -> Result<String> {
        let out = self.command(verb).output().with_context(|| format!("running scripts/kafka {verb}"))?;
        if !out.status.success() {
            bail!("scripts/kafka {verb} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn require_private(&self, what: &str) -> Result<()> {
        if self.private_dir.is_none() {
            bail!("{what} on the shared broker would break other tests: use Broker::private()");
        }
        Ok(())
    }

    /// Stops the broker gracefully (data kept): the network is "down" for clients.
    pub fn stop(&self) -> Result<()> {
        self.require_private("stop")?;
        self.script("down")
    }

    /// SIGKILLs the broker (data kept, as after a crash).
    pub fn kill(&self) -> Result<()> {
        self.require_private("kill")?;
        self.script("kill")
    }

    /// Starts a stopped broker again on the same ports, with its data.
    pub fn start(&self) -> Result<()> {
        self.require_private("start")?;
        self.script("up")
    }

    /// Stop + start.
    pub fn restart(&self) -> Result<()> {
        self.require_private("restart")?;
        self.script("restart")
    }

    /// Settings for the PLAINTEXT listener.
    pub fn plaintext(&self) -> KafkaConfig {
        KafkaConfig::plaintext(self.bootstrap.clone())
    }

    /// Settings for the mTLS listener with the project's client certificate.
    pub fn mtls(&self) -> KafkaConfig {
        KafkaConfig::mtls(
            self.bootstrap_tls.clone(),
            self.tls_dir.join("ca.pem"),
            self.tls_dir.join("client.pem"),
            self.tls_dir.join("client.key"),
        )
    }

    /// `FRAMELINK__KAFKA__*` overrides that point a shipped config (written for
    /// /etc/framelink) at this broker's mTLS listener and the project's client certificate.
    pub fn mtls_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FRAMELINK__KAFKA__BROKERS", self.bootstrap_tls.clone()),
            ("FRAMELINK__KAFKA__TLS__CA", self.tls_dir.join("ca.pem").display().to_string()),
            ("FRAMELINK__KAFKA__TLS__CERTIFICATE", self.tls_dir.join("client.pem").display().to_string()),
            ("FRAMELINK__KAFKA__TLS__KEY", self.tls_dir.join("client.key").display().to_string()),
        ]
    }

    /// Creates `topic` with `partitions` partitions and waits until it is usable.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.create_topic_with(topic, partitions, &[]).await
    }

    /// The offsets `group` committed on `topic`'s partitions 0..partitions (-1: none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Result<Vec<i64>> {
        use rdkafka::consumer::BaseConsumer;
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).set("group.id", group).create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
        Ok((0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect())
    }

    /// Sets topic-level configuration (e.g. `max.message.bytes`) on an existing topic.
    pub async fn alter_topic(&self, topic: &str, configs: &[(&str, &str)]) -> Result<()> {
        use rdkafka::admin::{AlterConfig, ResourceSpecifier};
        let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().context("admin client")?;
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (k, v) in configs {
            alter = alter.set(k, v);
        }
        for r in admin.alter_configs(&[alter], &AdminOptions::new()).await? {
            r.map_err(|(_, e)| anyhow::anyhow!("altering topic {topic}: {e}"))?;
        }
        Ok(())
    }

    /// As [`Broker::create_topic`], with topic-level configuration.
    pub async fn create_topic_with(&self, topic: &str, partitions: i32, configs: &[(&str, &str)]) -> Result<()> {
        let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().context("admin client")?;
        create_topic_and_wait(&admin, topic, partitions, 1, configs).await
    }
}

/// Creates `topic` with `partitions` partitions of `replicas` replicas and topic `configs`, then
/// waits (at most 30 s) until every partition has a leader and `replicas` in-sync replicas, so
/// that the first produce does not race the metadata. The single broker and the cluster share it.
pub async fn create_topic_and_wait(admin: &AdminClient<rdkafka::client::DefaultClientContext>, topic: &str, partitions: i32, replicas: i32, configs: &[(&str, &str)]) -> Result<()> {
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let results = admin.create_topics(&[new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let ready = md.topics().first().is_some_and(|t| {
            t.error().is_none() && t.partitions().len() == partitions as usize && t.partitions().iter().all(|p| p.leader() >= 0 && p.isr().len() == replicas as usize)
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {topic} has no leaders or fewer than {replicas} in-sync replicas after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.private_dir.is_some() {
            let _ = self.command("down").status();
        }
    }
}

/// A base port p such that p, p+1 and p+2 are free on 127.0.0.1.
fn free_port_triple() -> Result<u16> {
    free_port_base(&[0, 1, 2])
}

/// A base port p such that p + each of `offsets` is free on 127.0.0.1, below the kernel's
/// ephemeral range: a broker's ports inside that range can be taken, between this check and
/// the broker's bind, as the source port of any outgoing connection on the machine (the nodes
/// of a cluster connecting to each other's controllers, the clients of other tests).
pub(crate) fn free_port_base(offsets: &[u16]) -> Result<u16> {
    let span = offsets.iter().copied().max().unwrap_or(0);
    let (lo, hi) = below_ephemeral_range(span);
    let mut rng = rand::rng();
    for _ in 0..200 {
        let base: u16 = rng.random_range(lo..hi);
        if offsets.iter().all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no free port base in {lo}..{hi} found for offsets {offsets:?}")
}

/// Bases from 20000 up to the start of `/proc/sys/net/ipv4/ip_local_port_range` less `span`
/// (20000..60000 where that cannot be read or leaves too little room).
fn below_ephemeral_range(span: u16) -> (u16, u16) {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u16>().ok()));
    match first_ephemeral {
        Some(first) if first > 20000 + span + 1000 => (20000, first - span - 1),
        _ => (20000, 60000),
    }
}

/// A fresh topic name: `fl-test-<what>-<random>`.
pub fn rand_topic(what: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("fl-test-{what}-{n:016x}")
}

/// Client settings for producing/consuming frames of up to 16 MiB.
fn client_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut c = settings.client_config(client_id);
    c.set("message.max.bytes", "16777216");
    c
}

/// A producer of framelink records with link diagnosis.
pub struct Producer {
    inner: FutureProducer<LinkContext>,
    pub link: Arc<LinkStatus>,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> Result<Self> {
        let settings = cfg.validate("kafka")?;
        let link = Arc::new(LinkStatus::default());
        let inner = client_config(&settings, "framelink-testkit")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "20000")
            .create_with_context(LinkContext::new(link.clone()))
            .context("creating producer")?;
        Ok(Self { inner, link })
    }

    /// Sends one frame and waits for the broker's acknowledgement; returns (partition, offset).
    pub async fn send_frame(&self, topic: &str, meta: &FrameMeta, payload: &[u8]) -> Result<(i32, i64)> {
        let key = meta.key();
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(payload)
            .headers(meta.to_kafka_headers());
        let delivery = self.inner.send(record, Duration::from_secs(30)).await;
        match delivery {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => match self.link.diagnosis() {
                Some(d) => bail!("delivery to {topic} failed: {e}; {d}"),
                None => bail!("delivery to {topic} failed: {e}"),
            },
        }
    }

    /// Sends a raw record (any key, payload, headers) and waits for the acknowledgement.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<rdkafka::message::OwnedHeaders>,
    ) -> Result<(i32, i64)> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        record.key = key;
        record.payload = payload;
        record.headers = headers;
        self.inner
            .send(record, Duration::from_secs(30))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| anyhow::anyhow!("delivery to {topic} failed: {e}"))
    }
}

fn fresh_consumer(cfg: &KafkaConfig, topic: &str, isolation: &str) -> Result<StreamConsumer<LinkContext>> {
    let settings = cfg.validate("kafka")?;
    let group = format!("fl-test-group-{:016x}", rand::rng().random::<u64>());
    let consumer: StreamConsumer<LinkContext> = client_config(&settings, "framelink-testkit")
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "16777216")
        .create_with_context(LinkContext::default())
        .context("creating consumer")?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// How long a read waits for its consumer to be assigned partitions before its quiet time
/// starts anyway.
const JOIN_WAIT: Duration = Duration::from_secs(20);

/// Reads from the start of `topic` (fresh consumer group) until `max` records arrived, nothing
/// new came for `quiet` once the consumer had its partitions, or `timeout` passed.
async fn read(cfg: &KafkaConfig, topic: &str, max: usize, timeout: Duration, quiet: Duration) -> Result<Vec<OwnedMessage>> {
    read_with(cfg, topic, max, timeout, quiet, "read_committed").await
}

async fn read_with(cfg: &KafkaConfig, topic: &str, max: usize, timeout: Duration, quiet: Duration, isolation: &str) -> Result<Vec<OwnedMessage>> {
    let consumer = fresh_consumer(cfg, topic, isolation)?;
    let mut out = Vec::new();
    let created = tokio::time::Instant::now();
    let deadline = created + timeout;
    let mut last = created;
    let mut assigned = false;
    while out.len() < max && tokio::time::Instant::now() < deadline && last.elapsed() < quiet {
        // The quiet time runs from when the consumer has its partitions: joining a fresh group
        // takes seconds on a loaded machine, and is not silence from the topic (up to
        // JOIN_WAIT: a topic that does not exist is never assigned).
        if !assigned {
            assigned = consumer.assignment().is_ok_and(|a| a.count() > 0);
            if assigned || created.elapsed() < JOIN_WAIT {
                last = tokio::time::Instant::now();
            }
        }
        match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            Ok(Ok(m)) => {
                out.push(m.detach());
                last = tokio::time::Instant::now();
            }
            // One broker of a cluster down (a test's own doing): librdkafka reports it and
            // reads on from the others.
            Ok(Err(e)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!(topic, error = %e, "consuming: a broker is unreachable");
            }
            Ok(Err(e)) => bail!("consuming {topic}: {e}"),
            Err(_) => {}
        }
    }
    Ok(out)
}

/// Reads exactly `n` records from the start of `topic`, or fails after `timeout` saying how
/// many arrived.
pub async fn consume(cfg: &KafkaConfig, topic: &str, n: usize, timeout: Duration) -> Result<Vec<OwnedMessage>> {
    let out = read(cfg, topic, n, timeout, timeout).await?;
    if out.len() < n {
        bail!("consuming {topic}: {} of {n} records arrived within {timeout:?}", out.len());
    }
    Ok(out)
}

/// Reads everything on `topic` from the start: stops once nothing new arrived for `quiet`
/// after the consumer got its partitions (joining the group is not counted, up to 20 s).
pub async fn consume_all(cfg: &KafkaConfig, topic: &str, quiet: Duration) -> Result<Vec<OwnedMessage>> {
    read(cfg, topic, usize::MAX, Duration::from_secs(600), quiet).await
}

/// Like [`consume_all`], but also returns records of aborted transactions
/// (`isolation.level=read_uncommitted`, what a non-transactional reader sees).
pub async fn consume_all_uncommitted(cfg: &KafkaConfig, topic: &str, quiet: Duration) -> Result<Vec<OwnedMessage>> {
    read_with(cfg, topic, usize::MAX, Duration::from_secs(600), quiet, "read_uncommitted").await
}

/// The [`FrameMeta`] of a consumed record, with its key checked.
pub fn frame_meta(m: &OwnedMessage) -> Result<FrameMeta> {
    let headers = m.headers().context("record has no headers")?;
    let meta = FrameMeta::from_kafka_headers(headers)?;
    meta.check_key(m.key())?;
    Ok(meta)
}

/// A synthetic frame's metadata for tests.
pub fn test_meta(device: &str, camera: &str, seq: u64) -> FrameMeta {
    FrameMeta {
        device_id: device.into(),
        camera_id: camera.into(),
        seq,
        capture_ns: 1_700_000_000_000_000_000 + seq * 33_333_333,
        width: 64,
        height: 48,
        pixel_format: "RGB24".into(),
        content_type: framelink_common::wire::CONTENT_TYPE_JPEG.into(),
        clock: Default::default(),
    }
}

/// A client identity (CA, certificate, key) from a CA the broker does not know, written to
/// `dir` as `rogue-ca.pem`, `rogue-client.pem`, `rogue-client.key`.
pub fn rogue_identity(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    rogue_identity_valid_from(dir, 0)
}

/// As [`rogue_identity`], with the client certificate valid only from `days` days from now (a
/// device whose clock is behind, as a board without RTC before NTP).
pub fn rogue_identity_valid_from(dir: &Path, days: i64) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "rogue CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "rogue-client");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if days != 0 {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days);
        params.not_after = now + time::Duration::days(days + 365);
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let paths = (dir.join("rogue-ca.pem"), dir.join("rogue-client.pem"), dir.join("rogue-client.key"));
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// Installs a `tracing` subscriber printing to the test's output (once per test binary).
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,librdkafka=error".into()),
            )
            .with_test_writer()
            .try_init();
    });
}
