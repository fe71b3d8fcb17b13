//! Inference end to end: a real agent sends photographs (some with text rendered onto them)
//! from an image directory through the real broker; a worker with `pipeline = "detect:text"`
//! runs PP-OCRv4's text detector and publishes one detection event per frame with text, whose
//! boxes cover the rendered text in the source frame's pixels, and none for the plain frames.

use std::collections::BTreeMap;
use std::time::Duration;

use framelink_testkit::daemon::{Daemon, kafka_toml};
use framelink_testkit::inference::{fixtures, model, onnxruntime_library};
use framelink_testkit::{Broker, consume_all, init_tracing, rand_topic};
use rdkafka::message::Message;

mod support {
    pub mod worker;
}
use support::worker::{SERIAL, Topics, WORKER, agent_binary, worker_body};

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
}

#[tokio::test(flavor = "multi_thread")]
async fn i1_agent_frames_with_text_make_detection_events_on_the_real_broker() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = Topics { frames: rand_topic("inf-in"), results: rand_topic("inf-out"), events: rand_topic("inf-ev"), dlq: rand_topic("inf-dlq") };
    for name in [&t.frames, &t.results, &t.events, &t.dlq] {
        b.create_topic(name, 1).await.unwrap();
    }
    // The camera: a directory of three photographs with text and two without, in name order
    // (seq 0, 1: plain; 2, 3, 4: text).
    let fx = tempfile::tempdir().unwrap();
    fixtures(&["text", fx.path().to_str().unwrap()]);
    let boxes: BTreeMap<String, Vec<[f64; 4]>> = serde_json::from_slice(&std::fs::read(fx.path().join("boxes.json")).unwrap()).unwrap();
    let cam = tempfile::tempdir().unwrap();
    let files = ["plain-hubble_deep_field.png", "plain-retina.png", "text-astronaut.png", "text-coffee.png", "text-rocket.png"];
    for f in files {
        std::fs::copy(fx.path().join(f), cam.path().join(f)).unwrap();
    }
    let adir = tempfile::tempdir().unwrap();
    let agent_body = format!(
        "[device]\nid = \"site-9\"\n{}\n[[cameras]]\nid = \"gate\"\nimages = {{ path = {:?}, fps = 5, loop = false }}\n[spool]\ndir = {:?}\n[forwarder]\ntopic = {:?}\n",
        kafka_toml(&b.mtls()),
        cam.path().display().to_string(),
        adir.path().join("spool").display().to_string(),
        t.frames
    );
    let mut agent = Daemon::agent(&agent_binary(), adir.path(), &agent_body);
    let models = format!(
        "[inference]\nlibrary = {:?}\n[models.text]\npath = {:?}\nfamily = \"dbnet\"\nversion = \"PP-OCRv4\"\nchannels = \"bgr\"\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\nmin_side = 736\nmax_side = 2000\nunclip_ratio = 1.6\n",
        onnxruntime_library().display().to_string(),
        model("ch_PP-OCRv4_det_infer.onnx").display().to_string()
    );
    let wdir = tempfile::tempdir().unwrap();
    let mut worker = Daemon::worker(WORKER, wdir.path(), &worker_body(&b.mtls(), &t, "g-inf", "detect:text", &models)).env("FRAMELINK__WORKER__ID", "w-inf");
    worker.start();
    agent.start();
    worker.wait_for("5 frames processed", Duration::from_secs(120), |w| w.metric("frames_out_total", &[]) >= 5.0);
    let health = worker.healthz();
    assert_eq!(health["inference"]["models"]["text"]["family"], "dbnet", "{health}");
    assert_eq!(health["inference"]["models"]["text"]["frames"], 5, "{health}");
    assert_eq!(health["inference"]["models"]["text"]["frames_failed"], 0, "{health}");
    assert_eq!(health["inference"]["models"]["text"]["provider"], "cpu", "{health}");
    assert_eq!(worker.metric("inference_frames_total", &["model=\"text\""]), 5.0);
    assert_eq!(worker.metric("detection_events_total", &[]), 3.0);
    agent.stop();
    worker.stop();

    let results = consume_all(&b.plaintext(), &t.results, Duration::from_secs(4)).await.unwrap();
    assert_eq!(results.len(), 5, "every frame still has its result image");
    let events = consume_all(&b.plaintext(), &t.events, Duration::from_secs(4)).await.unwrap();
    assert_eq!(events.len(), 3, "one event per frame with text, none for the plain ones");
    for e in &events {
        assert_eq!(e.key(), Some(&b"site-9/gate"[..]), "keyed like the frame");
        let v: serde_json::Value = serde_json::from_slice(e.payload().unwrap()).unwrap();
        assert_eq!(v["type"], "detections");
        assert_eq!((v["device"].as_str(), v["camera"].as_str()), (Some("site-9"), Some("gate")));
        let seq = v["seq"].as_u64().unwrap();
        let file = files[seq as usize];
        assert!(file.starts_with("text-"), "an event for {file}: {v}");
        assert_eq!(v["models"][0]["name"], "text");
        assert_eq!(v["models"][0]["version"], "PP-OCRv4");
        assert_eq!(v["models"][0]["family"], "dbnet");
        assert!(v["models"][0]["inference_ms"].as_f64().unwrap() > 0.0, "{v}");
        let dets = v["detections"].as_array().unwrap();
        for want in &boxes[file] {
            let wc = [want[0], want[1], want[0] + want[2], want[1] + want[3]];
            let best = dets
                .iter()
                .map(|d| {
                    assert_eq!(d["label"], "text");
                    assert_eq!(d["model"], "text");
                    let bx = &d["box"];
                    let (x, y, w, h) = (bx["x"].as_f64().unwrap(), bx["y"].as_f64().unwrap(), bx["width"].as_f64().unwrap(), bx["height"].as_f64().unwrap());
                    iou([x, y, x + w, y + h], wc)
                })
                .fold(0.0, f64::max);
            assert!(best >= 0.5, "{file}: text at {want:?} covered by no detection (best IoU {best}): {v}");
        }
    }
}
