//! RTSP cameras and video files end to end: a loopback RTSP server from Debian's GStreamer
//! (`tests/rtsp/server.py`: x264 with B-frames, JPEG over RTP, x265) feeds the agent, which
//! forwards to the real broker; what arrives is checked frame by frame (each a JPEG of the
//! stream's size, every sequence number once and in order, a count within the configured
//! rate). Then the faults IP cameras have: the server killed and started again, frozen with
//! its socket open for longer than `stall_timeout_ms`, a wrong password, a wrong path, an
//! unreachable host, an H.265 stream — each a clear per-camera state, the other cameras
//! unaffected, recovery without an agent restart. Video files: an MP4 made at test time
//! (GStreamer's x264 with B-frames) read as fast as possible and in real time, and resumed
//! after a SIGKILL.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use framelink_testkit::daemon::{Agent, free_port};
use framelink_testkit::{Broker, init_tracing, rand_topic};

mod support {
    pub mod frames;
}
use support::frames::{AGENT, arrived, body, serial};

const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/rtsp/server.py");

/// The GStreamer RTSP server on a port of its own; killed when dropped.
struct RtspServer {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RtspServer {
    fn start(args: &[&str]) -> RtspServer {
        let mut s = RtspServer { port: free_port(), args: args.iter().map(|a| a.to_string()).collect(), child: None };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        use std::io::BufRead;
        let mut child = Command::new(SERVER)
            .arg("--port")
            .arg(self.port.to_string())
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tests/rtsp/server.py (scripts/bootstrap installs GStreamer's RTSP server)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "the RTSP server did not start: {line:?}");
        self.child = Some(child);
    }

    fn url(&self, path: &str) -> String {
        format!("rtsp://127.0.0.1:{}{path}", self.port)
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A frozen server must be woken to die.
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.kill();
    }
}

fn rtsp_camera(id: &str, url: &str, extra: &str) -> String {
    format!("[[cameras]]\nid = {id:?}\nrtsp = {{ url = {url:?}, stall_timeout_ms = 2000{extra} }}\n")
}

/// H.264 (decoded, sent at 5 fps of the camera's 25), the same with `keyframes_only` (an IDR
/// a second) and MJPEG (forwarded as sent, every frame) from the same server for a few seconds: JPEGs of the stream's size, every sequence number
/// once and in order, counts within the rates. Then the server is killed and started again,
/// and frozen (SIGSTOP, socket open) past the stall timeout: both cameras come back by
/// themselves, and frames resume.
#[tokio::test(flavor = "multi_thread")]
async fn r1_h264_and_mjpeg_arrive_at_their_rates_and_recover_from_server_faults() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-rtsp");
    broker.create_topic(&topic, 2).await.unwrap();
    let mut server = RtspServer::start(&["--width", "640", "--height", "360", "--fps", "25", "--gop", "25"]);
    let cams = rtsp_camera("h264", &server.url("/h264"), ", fps = 5")
        + &rtsp_camera("mjpeg", &server.url("/mjpeg"), "")
        + &rtsp_camera("keys", &server.url("/h264"), ", keyframes_only = true");
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-r1", &broker.mtls(), &topic, dir.path(), &cams, ""));
    agent.start();
    agent.wait_for("both cameras up", Duration::from_secs(30), |a| a.healthz()["cameras"]["h264"] == "up" && a.healthz()["cameras"]["mjpeg"] == "up");
    let at = |a: &Agent, cam: &str| a.metric("frames_sent_total", &[&format!("camera=\"{cam}\"")]);
    let (h0, m0, k0) = (at(&agent, "h264"), at(&agent, "mjpeg"), at(&agent, "keys"));
    std::thread::sleep(Duration::from_secs(8));
    let (h1, m1, k1) = (at(&agent, "h264"), at(&agent, "mjpeg"), at(&agent, "keys"));
    println!("r1: in 8 s: h264 {} frames (fps = 5), mjpeg {} frames (the camera's 25), keyframes only {} (an IDR a second)", h1 - h0, m1 - m0, k1 - k0);
    assert!((6.0..=10.0).contains(&(k1 - k0)), "keyframes_only: one IDR a second, {} frames in 8 s", k1 - k0);
    assert!((30.0..=45.0).contains(&(h1 - h0)), "h264 at 5 fps: {} frames in 8 s", h1 - h0);
    assert!((120.0..=215.0).contains(&(m1 - m0)), "mjpeg at the camera's 25 fps: {} frames in 8 s", m1 - m0);

    // The server dies and comes back on the same port.
    server.kill();
    agent.wait_for("the cameras notice", Duration::from_secs(20), |a| a.healthz()["cameras"]["h264"] != "up");
    server.spawn();
    let before = (at(&agent, "h264"), at(&agent, "mjpeg"));
    agent.wait_for("frames again after the restart", Duration::from_secs(60), |a| at(a, "h264") >= before.0 + 10.0 && at(a, "mjpeg") >= before.1 + 10.0);

    // Frozen with its sockets open: no RST, no FIN, just silence.
    server.signal("-STOP");
    agent.wait_for("the stall is judged", Duration::from_secs(20), |a| {
        a.healthz()["cameras"]["h264"].as_str().is_some_and(|s| s.starts_with("reconnecting: ") && s.contains("stall_timeout_ms"))
    });
    server.signal("-CONT");
    let before = (at(&agent, "h264"), at(&agent, "mjpeg"));
    agent.wait_for("frames again after the freeze", Duration::from_secs(60), |a| at(a, "h264") >= before.0 + 10.0 && at(a, "mjpeg") >= before.1 + 10.0);
    let health = agent.healthz();
    let log = agent.log_text();
    let reconnects = |cam: &str| agent.metric("camera_reconnects_total", &[&format!("camera=\"{cam}\"")]);
    let (hr, mr) = (reconnects("h264"), reconnects("mjpeg"));
    let last = agent.metric("camera_last_frame_unix_seconds", &["camera=\"h264\""]);
    let stream = |name: &str, cam: &str| agent.metric(name, &[&format!("camera=\"{cam}\"")]);
    let (received, decoded, sent) = (stream("camera_frames_received", "h264"), stream("camera_frames_decoded", "h264"), at(&agent, "h264"));
    let (k_received, k_decoded) = (stream("camera_frames_received", "keys"), stream("camera_frames_decoded", "keys"));
    println!("r1: h264 at fps = 5: {received} received, {decoded} decoded, {sent} sent; keyframes_only: {k_received} received, {k_decoded} decoded");
    agent.stop();
    assert!(received > 3.0 * sent, "fps = 5 of 25: most frames received are not sent ({received} received, {sent} sent)");
    assert!(decoded < received, "disposable frames that are not due are not decoded ({decoded} of {received})");
    assert!(k_decoded * 10.0 < k_received, "keyframes_only decodes one frame in 25 ({k_decoded} of {k_received})");
    assert_eq!(health["cameras"]["h264"], "up", "{health}");
    assert!(log.contains("re-opening"), "the reconnects are logged");
    assert!(hr >= 2.0 && mr >= 2.0, "a restart and a freeze: reconnects h264 {hr}, mjpeg {mr}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - last).abs() < 10.0, "the last frame's time: {last} (now {now})");

    let got = arrived(&broker.mtls(), &topic).await;
    for cam in ["h264", "mjpeg", "keys"] {
        let seqs = got.seqs(cam);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "camera {cam}: every frame once, in order");
        assert_eq!(seqs.first(), Some(&0), "camera {cam}: from the first frame");
        println!("r1: camera {cam}: {} frames arrived", seqs.len());
    }
    // Sizes: `arrived` checked every JPEG against its headers; the stream's size is 640x360.
    let msgs = framelink_testkit::consume_all(&broker.mtls(), &topic, Duration::from_secs(5)).await.unwrap();
    let mut camera_clock = std::collections::BTreeMap::<String, usize>::new();
    for m in &msgs {
        use rdkafka::Message;
        let meta = framelink_testkit::frame_meta(m).unwrap();
        assert_eq!((meta.width, meta.height), (640, 360), "{meta:?}");
        let expected_format = if meta.camera_id == "mjpeg" { "MJPG" } else { "H264" };
        assert_eq!(meta.pixel_format, expected_format);
        if meta.clock == framelink_common::CaptureClock::Camera {
            *camera_clock.entry(meta.camera_id.clone()).or_default() += 1;
            // The server's clock is this machine's: the camera time is close to when the
            // agent produced the record.
            let produced_ms = m.timestamp().to_millis().unwrap();
            let off_ms = (meta.capture_ns / 1_000_000) as i64 - produced_ms;
            assert!(off_ms.abs() < 2_000, "{}#{}: camera time {} ms from the record's time", meta.camera_id, meta.seq, off_ms);
        }
    }
    println!("r1: records with the camera's clock (RTCP sender reports): {camera_clock:?}");
    for cam in ["h264", "mjpeg"] {
        assert!(camera_clock.get(cam).copied().unwrap_or(0) > 10, "camera {cam}: capture times from the camera's RTCP clock: {camera_clock:?}");
    }
}

/// What users get wrong and networks do: a wrong password, a wrong path, an unreachable host
/// and an H.265 stream each give a clear state for that camera on `/healthz` (no password in
/// it or in the log), while a good camera beside them (over UDP) delivers.
#[tokio::test(flavor = "multi_thread")]
async fn r2_bad_cameras_get_clear_errors_and_leave_the_others_alone() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-rtsp-bad");
    broker.create_topic(&topic, 1).await.unwrap();
    let server = RtspServer::start(&["--auth", "cam:right-one"]);
    let dead = free_port();
    let good = server.url("/h264").replace("rtsp://", "rtsp://cam:right-one@");
    // The good camera over UDP (RTP and RTCP on ports of their own), the rest over TCP.
    let cams = rtsp_camera("good", &good, ", fps = 5, transport = \"udp\"")
        + &rtsp_camera("badpass", &server.url("/h264").replace("rtsp://", "rtsp://cam:wrong-one@"), "")
        + &rtsp_camera("nopath", &good.replace("/h264", "/nothing-here"), "")
        + &rtsp_camera("nohost", &format!("rtsp://127.0.0.1:{dead}/h264"), "")
        // openh264 decodes H.264 only (with libavcodec built in, r3 decodes this stream).
        + &rtsp_camera("hevc", &good.replace("/h264", "/h265"), if cfg!(feature = "libav") { ", decoder = \"openh264\"" } else { "" });
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-r2", &broker.mtls(), &topic, dir.path(), &cams, ""));
    agent.start();
    agent.wait_for("the good camera delivers", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 20.0);
    let health = agent.healthz();
    let log = agent.log_text();
    agent.stop();
    let state = |cam: &str| health["cameras"][cam].as_str().unwrap_or_default().to_owned();
    println!("r2: {health}");
    assert_eq!(state("good"), "up");
    for cam in ["badpass", "nopath", "nohost", "hevc"] {
        assert!(state(cam).starts_with("error: "), "{cam}: {}", state(cam));
    }
    assert!(state("badpass").contains("401") || state("badpass").to_lowercase().contains("unauthorized"), "{}", state("badpass"));
    assert!(state("nopath").contains("404") || state("nopath").to_lowercase().contains("not found"), "{}", state("nopath"));
    assert!(state("nohost").to_lowercase().contains("refused"), "{}", state("nohost"));
    assert!(state("hevc").contains("H.265") && state("hevc").contains("`hevc`") && state("hevc").contains("H.264 sub-stream"), "{}", state("hevc"));
    for secret in ["right-one", "wrong-one"] {
        assert!(!health.to_string().contains(secret), "/healthz shows a password");
        assert!(!log.contains(secret), "the log shows a password");
    }
    let got = arrived(&broker.mtls(), &topic).await;
    assert!(got.seqs("good").len() >= 20);
    assert_eq!(got.per_camera.len(), 1, "only the good camera delivered");
}

/// With libavcodec built in (`--features libav`; CI runs this one test so): an H.265 camera
/// (x265, B-frames off, an IDR a second) is decoded — frames of the stream's size, pixel format
/// `H265` —, and the H.264 camera beside it is decoded by libavcodec too (`decoder = "auto"`).
#[cfg(feature = "libav")]
#[tokio::test(flavor = "multi_thread")]
async fn r3_with_libavcodec_h265_and_h264_cameras_are_decoded() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-rtsp-hevc");
    broker.create_topic(&topic, 1).await.unwrap();
    let server = RtspServer::start(&[]);
    let cams = rtsp_camera("hevc", &server.url("/h265"), ", fps = 5") + &rtsp_camera("avc", &server.url("/h264"), ", fps = 5");
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-r3", &broker.mtls(), &topic, dir.path(), &cams, ""));
    agent.start();
    let at = |a: &Agent, cam: &str| a.metric("frames_sent_total", &[&format!("camera=\"{cam}\"")]);
    agent.wait_for("both cameras deliver", Duration::from_secs(60), |a| at(a, "hevc") >= 20.0 && at(a, "avc") >= 20.0);
    let undecodable = agent.metric("camera_frames_undecodable", &[]);
    let log = agent.log_text();
    agent.stop();
    assert_eq!(undecodable, 0.0, "every frame decoded");
    for codec in ["H.265", "H.264"] {
        assert!(log.contains(&format!("RTSP stream decoded. camera=")) && log.contains(&format!("codec=\"{codec}\" decoder=\"libavcodec\"")), "{codec} by libavcodec: {log}");
    }
    let got = arrived(&broker.mtls(), &topic).await;
    for cam in ["hevc", "avc"] {
        let seqs = got.seqs(cam);
        assert!(seqs.len() >= 20 && seqs.windows(2).all(|w| w[0] < w[1]), "camera {cam}: every frame once, in order");
    }
    let msgs = framelink_testkit::consume_all(&broker.mtls(), &topic, Duration::from_secs(5)).await.unwrap();
    for m in &msgs {
        let meta = framelink_testkit::frame_meta(m).unwrap();
        assert_eq!((meta.width, meta.height), (640, 360), "{meta:?}");
        assert_eq!(meta.pixel_format, if meta.camera_id == "hevc" { "H265" } else { "H264" });
    }
}

/// An H.264 MP4 of `frames` pictures (640x360, 25 fps, B-frames, an IDR a second) made by
/// GStreamer.
fn make_mp4(path: &std::path::Path, frames: u32) {
    let out = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(format!("videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=640,height=360,framerate=25/1 ! videoconvert ! x264enc speed-preset=ultrafast bframes=2 b-adapt=false key-int-max=25 ! video/x-h264,profile=main ! mp4mux ! filesink").split(' '))
        .arg(format!("location={}", path.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "gst-launch-1.0: {}", String::from_utf8_lossy(&out.stderr));
}

fn video_camera(id: &str, path: &std::path::Path, extra: &str) -> String {
    format!("[[cameras]]\nid = {id:?}\nvideo = {{ path = {:?}{extra} }}\n", path.display().to_string())
}

/// A 250-picture MP4 ingested with `pace = "fast"` (nothing dropped for a busy encoder) beside
/// the same file at 5 fps in real time: every picture of the fast one arrives once, in order,
/// as a 640x360 JPEG, and the camera finishes; the real-time one keeps every 5th picture.
/// Then a real-time replay is SIGKILLed 5 s in and started again: it resumes where it stopped
/// (the last 2–3 s again), not from the start, and the pictures of both runs cover the file.
#[tokio::test(flavor = "multi_thread")]
async fn v1_a_video_file_fast_and_in_real_time_and_resumed_after_a_kill() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-video");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    make_mp4(&clip, 250);
    let cams = video_camera("bulk", &clip, ", pace = \"fast\"") + &video_camera("slow", &clip, ", fps = 5");
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-v1", &broker.mtls(), &topic, dir.path(), &cams, ""));
    agent.start();
    agent.wait_for("both files read", Duration::from_secs(60), |a| a.healthz()["cameras"]["bulk"] == "finished" && a.healthz()["cameras"]["slow"] == "finished");
    agent.wait_for("all sent", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 300.0);
    assert_eq!(agent.metric("frames_dropped_total", &[]), 0.0);
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    assert_eq!(got.seqs("bulk"), (0..250).collect::<Vec<u64>>().as_slice(), "every picture once, in order");
    assert_eq!(got.seqs("slow"), (0..50).collect::<Vec<u64>>().as_slice(), "every 5th picture: 50");
    let msgs = framelink_testkit::consume_all(&broker.mtls(), &topic, Duration::from_secs(3)).await.unwrap();
    for m in msgs.iter().take(20) {
        let meta = framelink_testkit::frame_meta(m).unwrap();
        assert_eq!((meta.width, meta.height, meta.pixel_format.as_str()), (640, 360, "H264"));
    }
    // A second start does not send a finished file again.
    agent.start();
    agent.wait_for("finished again", Duration::from_secs(30), |a| a.healthz()["cameras"]["bulk"] == "finished");
    assert_eq!(agent.metric("frames_captured_total", &["camera=\"bulk\""]), 0.0, "the position says the file is done");
    agent.stop();

    // Real time, killed 5 s in (about 125 of 250 pictures), started again.
    let topic = rand_topic("agent-video-kill");
    broker.create_topic(&topic, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-v1b", &broker.mtls(), &topic, dir.path(), &video_camera("replay", &clip, ""), ""));
    agent.start();
    agent.wait_for("5 s of replay", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 125.0);
    agent.kill();
    let first = arrived(&broker.mtls(), &topic).await.seqs("replay").len();
    agent.start();
    agent.wait_for("the replay finished", Duration::from_secs(30), |a| a.healthz()["cameras"]["replay"] == "finished");
    let second = agent.metric("frames_sent_total", &[]);
    let log = agent.log_text();
    agent.stop();
    println!("v1: replay killed after {first} pictures; the restart sent {second}; together {} for 250", first as f64 + second);
    assert!(log.contains("Video resumes after the pictures already sent"), "the restart resumed");
    assert!(second < 250.0 - 25.0, "resumed, not from the start: {second}");
    assert!(first as f64 + second >= 250.0, "the two runs cover the file: {first} + {second}");
    // The position written is 2 s old and written every second: 2–3 s again, plus the kill's own delay.
    assert!(first as f64 + second <= 250.0 + 4.0 * 25.0, "at most the last ~3 s again: {first} + {second}");
}

/// `pace = "fast"` while Kafka is unreachable (the device booted without a network): the file
/// hands over at most 32 frames without an acknowledgement, then pauses (camera `paused: the
/// link to Kafka is down` once the link is judged stalled; nothing more read) instead of
/// pouring itself into librdkafka's memory and the spool, and goes on by itself when the
/// broker is back: every picture once, in order, nothing dropped.
#[tokio::test(flavor = "multi_thread")]
async fn v2_a_fast_file_pauses_while_kafka_is_down_and_goes_on_when_it_is_back() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-video-pause");
    broker.create_topic(&topic, 1).await.unwrap();
    broker.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    make_mp4(&clip, 500);
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-v2", &broker.mtls(), &topic, dir.path(), &video_camera("bulk", &clip, ", pace = \"fast\""), ""));
    agent.start();
    agent.wait_for("the file paused", Duration::from_secs(60), |a| a.healthz()["cameras"]["bulk"].as_str().is_some_and(|s| s.starts_with("paused: the link to Kafka is")));
    let before = agent.metric("frames_captured_total", &["camera=\"bulk\""]);
    std::thread::sleep(Duration::from_secs(3));
    let after = agent.metric("frames_captured_total", &["camera=\"bulk\""]);
    assert_eq!(after, before, "nothing read while paused");
    // 32 unacknowledged, plus what the queues to the forwarder (64 + 2) hold at most.
    assert!(before <= 32.0 + 66.0, "paused after at most ~100 pictures: {before}");
    broker.start().unwrap();
    agent.wait_for("the file finished", Duration::from_secs(120), |a| a.healthz()["cameras"]["bulk"] == "finished");
    agent.wait_for("all sent", Duration::from_secs(60), |a| a.metric("frames_sent_total", &[]) >= 500.0);
    assert_eq!(agent.metric("frames_dropped_total", &[]), 0.0);
    agent.stop();
    println!("v2: {before} pictures read before the link was seen down (spooled, then drained)");
    let got = arrived(&broker.mtls(), &topic).await;
    assert_eq!(got.seqs("bulk"), (0..500).collect::<Vec<u64>>().as_slice(), "every picture once, in order");
}
