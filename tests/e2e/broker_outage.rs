//! The test support's outage tools on a private broker: records survive a graceful stop, a
//! SIGKILL and a restart, and a client reconnects by itself afterwards.

use std::time::Duration;

use framelink_testkit::*;
use rdkafka::message::Message;

#[tokio::test]
async fn records_survive_stop_kill_and_restart_of_a_private_broker() {
    init_tracing();
    let broker = Broker::private().unwrap();
    assert_ne!(broker.bootstrap, Broker::shared().bootstrap, "a broker of its own");
    let topic = rand_topic("outage");
    broker.create_topic(&topic, 2).await.unwrap();
    let cfg = broker.mtls();
    let producer = Producer::new(&cfg).unwrap();
    let mut seq = 0;
    let mut send = async |n: u64| {
        for _ in 0..n {
            producer.send_frame(&topic, &test_meta("dev", "cam0", seq), &seq.to_be_bytes()).await.unwrap();
            seq += 1;
        }
    };
    send(10).await;
    broker.stop().unwrap();
    assert!(
        framelink_common::link::check_connection(&cfg.validate("kafka").unwrap(), Duration::from_secs(2)).is_err(),
        "the broker is really down"
    );
    broker.start().unwrap();
    send(10).await; // the same producer reconnects by itself
    broker.kill().unwrap();
    broker.start().unwrap();
    send(10).await;
    broker.restart().unwrap();

    let got = consume(&cfg, &topic, 30, Duration::from_secs(60)).await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|m| frame_meta(m).unwrap().seq).collect();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>(), "every record, once, in order");
    assert!(got.iter().all(|m| m.payload().unwrap().len() == 8));
}

#[test]
fn the_shared_broker_cannot_be_stopped_by_a_test() {
    let err = Broker::shared().stop().unwrap_err().to_string();
    assert!(err.contains("Broker::private"), "{err}");
}
