//! A real V4L2 device end to end: the agent runs inside a qemu VM whose kernel loads `vivid`
//! (a virtual V4L2 camera), captures YUYV 1280x720 into its spool with no network
//! (tests/vm/vivid-capture), and an agent on the host drains that spool into Kafka, where
//! every frame must arrive with the right size, format and sequence.

use std::time::Duration;

use framelink_testkit::{Broker, consume_all, frame_meta, rand_topic, repo_root};
use rdkafka::message::Message;
use framelink_testkit::daemon::{Agent, kafka_toml};

const AGENT: &str = env!("CARGO_BIN_EXE_framelink-agent");

/// `key=value` from the VM agent's "Agent stopped." summary line.
fn summary(log: &str, key: &str) -> u64 {
    let line = log.lines().find(|l| l.contains("Agent stopped.")).unwrap_or_else(|| panic!("no summary in the VM log:\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn v4l2_frames_captured_in_a_vm_arrive_in_kafka_via_the_spool() {
    let broker = Broker::shared();
    let topic = rand_topic("vivid");
    broker.create_topic(&topic, 1).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(repo_root().join("tests/vm/vivid-capture"))
        .args([env!("CARGO_BIN_EXE_framelink-agent"), out.path().to_str().unwrap(), "12"])
        .status()
        .unwrap();
    assert!(status.success(), "the VM run failed");
    let vm_log = std::fs::read_to_string(out.path().join("agent.log")).unwrap();
    assert!(vm_log.contains("V4L2 camera open.") && vm_log.contains("format=YUYV") && vm_log.contains("width=1280"), "{vm_log}");
    let (captured, spooled, dropped) = (summary(&vm_log, "captured"), summary(&vm_log, "in_spool"), summary(&vm_log, "dropped"));
    assert!(spooled >= 5, "at least a few frames captured in the VM: {spooled}");
    assert_eq!(captured, spooled + dropped, "every VM frame spooled or counted (encoder_behind under emulation)");

    // A drain-only agent on the host forwards the VM's spool.
    let dir = tempfile::tempdir().unwrap();
    let spool = out.path().join("spool");
    let body = format!(
        "cameras = []\n[device]\nid = \"host-drainer\"\n{}\n[spool]\ndir = {:?}\n[forwarder]\ntopic = {topic:?}\n",
        kafka_toml(&broker.mtls()),
        spool.display().to_string()
    );
    let mut agent = Agent::agent(AGENT, dir.path(), &body);
    agent.start();
    agent.wait_for("the VM's spool drained", Duration::from_secs(60), |a| {
        a.metric("frames_sent_total", &[]) == spooled as f64 && a.metric("spool_records", &[]) == 0.0
    });
    agent.stop();

    let msgs = consume_all(&broker.mtls(), &topic, Duration::from_secs(8)).await.unwrap();
    assert_eq!(msgs.len() as u64, spooled);
    let mut last = None;
    for m in &msgs {
        let meta = frame_meta(m).unwrap();
        assert_eq!((meta.device_id.as_str(), meta.camera_id.as_str()), ("vivid-vm", "vivid0"));
        assert_eq!(meta.pixel_format, "YUYV");
        assert_eq!((meta.width, meta.height), (1280, 720));
        let h = turbojpeg::read_header(m.payload().unwrap()).unwrap();
        assert_eq!((h.width, h.height), (1280, 720), "the JPEG decodes to the camera's size");
        assert!(last.is_none_or(|l| meta.seq > l), "sequence increases: {last:?} then {}", meta.seq);
        last = Some(meta.seq);
    }
    let first = frame_meta(&msgs[0]).unwrap().seq;
    assert_eq!(first, 0, "a fresh camera starts at 0");
    assert!(last.unwrap() < captured, "no sequence number beyond what was captured");
}
