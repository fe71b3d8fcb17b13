//! A private three-node Kafka cluster (`scripts/kafka cluster`) for tests of leader failover
//! and `min.insync.replicas`: three KRaft nodes (each broker + controller, node ids 1, 2, 3) on
//! 127.0.0.1, replication factor 3 and `min.insync.replicas=2` for every topic.
//!
//! [`Cluster::private`] starts one in a temporary directory on a free port base, so several
//! test binaries may each run one. Three JVMs are heavy for a 2-core machine (≈ 1 GB RSS
//! together, tens of seconds to start): tests that use a cluster must not run in parallel
//! within one binary — give each binary one test that uses it, or share one cluster between
//! the tests of a binary (they then must not stop nodes under each other's feet). The cluster
//! is killed and its state removed when the [`Cluster`] is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use framelink_common::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

use crate::repo_root;

/// The node ids of a cluster.
pub const NODES: [i32; 3] = [1, 2, 3];

/// A running three-node cluster started by `scripts/kafka cluster up`.
#[derive(Debug)]
pub struct Cluster {
    bootstrap: String,
    bootstrap_tls: String,
    tls_dir: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    /// A cluster of this test's own: a temporary state directory and a free port base (node N
    /// on base + 10·(N−1) … +2). Returns once all three nodes answer and are live brokers.
    ///
    /// A node that could not bind its ports (taken by another process between the choice of
    /// the base and the node's start) is not the cluster failing: the whole cluster is then
    /// started again once, on another base in another directory. Any other failure is returned.
    pub fn private() -> Result<Cluster> {
        let mut c = Cluster::new_private()?;
        if let Err(e) = c.script(&["up"]) {
            if !c.bind_failed() {
                return Err(e);
            }
            eprintln!("kafka cluster: a node could not bind its ports on base {}; starting again on another", c.port);
            drop(c);
            c = Cluster::new_private()?;
            c.script(&["up"])?;
        }
        let out = c.script_output(&["env"])?;
        let vars: HashMap<_, _> = out.lines().filter_map(|l| l.split_once('=')).collect();
        c.bootstrap = vars.get("FRAMELINK_CLUSTER_BOOTSTRAP").context("FRAMELINK_CLUSTER_BOOTSTRAP")?.to_string();
        c.bootstrap_tls = vars.get("FRAMELINK_CLUSTER_BOOTSTRAP_TLS").context("FRAMELINK_CLUSTER_BOOTSTRAP_TLS")?.to_string();
        c.tls_dir = PathBuf::from(vars.get("FRAMELINK_TLS_DIR").context("FRAMELINK_TLS_DIR")?);
        Ok(c)
    }

    fn new_private() -> Result<Cluster> {
        Ok(Cluster {
            bootstrap: String::new(),
            bootstrap_tls: String::new(),
            tls_dir: PathBuf::new(),
            dir: tempfile::Builder::new().prefix("framelink-kafka-cluster-").tempdir()?,
            port: free_cluster_base()?,
        })
    }

    /// Whether a node's log says it could not bind a listener.
    fn bind_failed(&self) -> bool {
        NODES.iter().any(|n| {
            let logs = self.dir.path().join(format!("node-{n}/logs"));
            ["server.log", "stdout.log"].iter().any(|f| {
                std::fs::read_to_string(logs.join(f))
                    .is_ok_and(|t| t.contains("BindException") || t.contains("Address already in use"))
            })
        })
    }

    /// All three PLAINTEXT `host:port`s, comma-separated.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// All three mTLS `host:port`s, comma-separated.
    pub fn bootstrap_tls(&self) -> &str {
        &self.bootstrap_tls
    }

    /// Holds the cluster's `ca.pem`, `client.pem`, `client.key`.
    pub fn tls_dir(&self) -> &Path {
        &self.tls_dir
    }

    /// The PLAINTEXT `host:port` of node `n` alone.
    pub fn node_bootstrap(&self, n: i32) -> String {
        format!("127.0.0.1:{}", self.port as i32 + 10 * (n - 1))
    }

    /// Settings for the PLAINTEXT listeners of all three nodes.
    pub fn plaintext(&self) -> KafkaConfig {
        KafkaConfig::plaintext(self.bootstrap.clone())
    }

    /// Settings for the mTLS listeners of all three nodes with the cluster's client certificate.
    pub fn mtls(&self) -> KafkaConfig {
        KafkaConfig::mtls(
            self.bootstrap_tls.clone(),
            self.tls_dir.join("ca.pem"),
            self.tls_dir.join("client.pem"),
            self.tls_dir.join("client.key"),
        )
    }

    /// SIGKILLs node `n` (a crash; its data is kept).
    pub fn kill(&self, n: i32) -> Result<()> {
        self.script(&["kill", &node(n)?])
    }

    /// Stops node `n` gracefully (controlled shutdown: its leaderships move first).
    pub fn stop(&self, n: i32) -> Result<()> {
        self.script(&["stop", &node(n)?])
    }

    /// Starts node `n` again with its data; returns once it answers and is a live broker.
    /// Needs a controller quorum: at least one other node running.
    pub fn start(&self, n: i32) -> Result<()> {
        self.script(&["start", &node(n)?])
    }

    /// Stop + start of node `n`.
    pub fn restart(&self, n: i32) -> Result<()> {
        self.script(&["restart", &node(n)?])
    }

    /// The node id of `topic`'s `partition`'s current leader (-1: none), as the cluster's
    /// metadata says now (a node killed a moment ago stays leader until the controller fences
    /// it, ≈ 9 s).
    pub fn leader_of(&self, topic: &str, partition: i32) -> Result<i32> {
        Ok(self.partition(topic, partition)?.0)
    }

    /// The node ids in `topic`'s `partition`'s in-sync replica set, sorted.
    pub fn isr_of(&self, topic: &str, partition: i32) -> Result<Vec<i32>> {
        Ok(self.partition(topic, partition)?.1)
    }

    fn partition(&self, topic: &str, partition: i32) -> Result<(i32, Vec<i32>)> {
        let md = self.admin()?.inner().fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let t = md.topics().first().with_context(|| format!("no metadata for {topic}"))?;
        if let Some(e) = t.error() {
            bail!("metadata for {topic}: {e:?}");
        }
        let p = t
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .with_context(|| format!("{topic} has no partition {partition}"))?;
        let mut isr = p.isr().to_vec();
        isr.sort();
        Ok((p.leader(), isr))
    }

    /// Waits until `topic`'s `partition` has `want` (sorted) as its in-sync replicas.
    pub async fn wait_for_isr(&self, topic: &str, partition: i32, want: &[i32], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let isr = self.isr_of(topic, partition);
            if matches!(&isr, Ok(isr) if isr == want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{topic}/{partition}: in-sync replicas {isr:?} after {timeout:?}, wanted {want:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Creates `topic` with `partitions` partitions and replication factor 3, and waits until
    /// every partition has a leader and all three replicas in sync.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        crate::create_topic_and_wait(&self.admin()?, topic, partitions, 3, &[]).await
    }

    /// A topic's configuration value as the cluster resolves it (topic, cluster or broker
    /// default), e.g. `min.insync.replicas`.
    pub async fn topic_config(&self, topic: &str, key: &str) -> Result<Option<String>> {
        use rdkafka::admin::ResourceSpecifier;
        let results = self.admin()?.describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new()).await?;
        let resource = results.into_iter().next().context("no describe_configs result")?.map_err(|e| anyhow::anyhow!("describing {topic}: {e}"))?;
        Ok(resource.get(key).and_then(|e| e.value.clone()))
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().context("admin client")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(repo_root().join("scripts/kafka"));
        c.arg("cluster").args(args);
        c.env("FRAMELINK_KAFKA_CLUSTER_DIR", self.dir.path())
            .env("FRAMELINK_KAFKA_CLUSTER_PORT", self.port.to_string())
            .env("FRAMELINK_KAFKA_LIMITS", "frames");
        // Three JVMs starting beside a loaded test run: allow more than the script's 90 s.
        if std::env::var_os("FRAMELINK_KAFKA_TIMEOUT").is_none() {
            c.env("FRAMELINK_KAFKA_TIMEOUT", "180");
        }
        c
    }

    fn script(&self, args: &[&str]) -> Result<()> {
        let what = args.join(" ");
        let status = self.command(args).status().with_context(|| format!("running scripts/kafka cluster {what}"))?;
        if !status.success() {
            bail!("scripts/kafka cluster {what} failed: {status}");
        }
        Ok(())
    }

    fn script_output(&self, args: &[&str]) -> Result<String> {
        let what = args.join(" ");
        let out = self.command(args).output().with_context(|| format!("running scripts/kafka cluster {what}"))?;
        if !out.status.success() {
            bail!("scripts/kafka cluster {what} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for Cluster {
    /// SIGKILLs every node (a graceful stop waits for a controller quorum that may be gone);
    /// the temporary directory, data included, goes with `dir`.
    fn drop(&mut self) {
        for n in NODES {
            let _ = self.command(&["kill", &n.to_string()]).output();
        }
    }
}

fn node(n: i32) -> Result<String> {
    if !NODES.contains(&n) {
        bail!("a cluster has nodes 1, 2 and 3, not {n}");
    }
    Ok(n.to_string())
}

/// A base port p such that p…p+2, p+10…p+12 and p+20…p+22 are free on 127.0.0.1.
fn free_cluster_base() -> Result<u16> {
    crate::free_port_base(&[0, 1, 2, 10, 11, 12, 20, 21, 22])
}
