//! Large-image jobs end to end on the real broker: `framelink-console`'s `/api/jobs` with two
//! real workers. A 4096x4096 upload comes back stitched **bit-identical** to the whole image
//! processed at once, while a worker is SIGKILLed and the console itself is killed and
//! restarted mid-job; bad uploads get 4xx answers naming the cause and nothing else breaks; a
//! cancelled job's tiles are skipped by the workers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use framelink_testkit::daemon::{Daemon, kafka_toml};
use framelink_testkit::{Broker, init_tracing, rand_topic};
use framelink_worker::ops::{Apply, Img, Pipeline};
use serde_json::Value;

const CONSOLE: &str = env!("CARGO_BIN_EXE_framelink-console");

/// Tests here start daemons that share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn sibling_binary(name: &str) -> String {
    let p = PathBuf::from(CONSOLE).parent().unwrap().join(name);
    assert!(p.exists(), "{} is missing: build the workspace's binaries (`cargo test --workspace --no-run`)", p.display());
    p.display().to_string()
}

fn photo(name: &str) -> image::RgbImage {
    image::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images").join(name)).unwrap().into_rgb8()
}

/// A `size`×`size` RGB image made of the test photographs (each mirrored every other time, so
/// no two neighbouring tiles repeat and every seam has real detail across it).
fn mosaic(size: u32) -> Img {
    let photos = [photo("retina.jpg"), photo("hubble_deep_field.jpg"), photo("coffee.png"), photo("astronaut.png"), photo("rocket.jpg")];
    let mut out = image::RgbImage::new(size, size);
    let (mut x, mut y, mut k) = (0u32, 0u32, 0usize);
    while y < size {
        let p = &photos[k % photos.len()];
        let p = if k % 2 == 1 { image::imageops::flip_horizontal(p) } else { p.clone() };
        image::imageops::replace(&mut out, &p, x as i64, y as i64);
        x += p.width();
        k += 1;
        if x >= size {
            x = 0;
            y += 640;
        }
    }
    let (w, h) = out.dimensions();
    Img::new(w, h, 3, out.into_raw())
}

fn png(img: &Img) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let color = if img.channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    image::codecs::png::PngEncoder::new_with_quality(&mut out, image::codecs::png::CompressionType::Fast, image::codecs::png::FilterType::Sub).write_image(&img.data, img.width, img.height, color).unwrap();
    out
}

/// One HTTP/1.1 request with a binary body: (status, headers, body).
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n", body.len()).unwrap();
    // The server may answer (and close) before the whole body is sent: an upload over the limit.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {} bytes: {:?}", out.len(), String::from_utf8_lossy(&out)));
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    (status, head, out[split + 4..].to_vec())
}

/// A multipart/form-data upload.
fn upload(port: u16, file: &[u8], file_name: &str, fields: &[(&str, &str)]) -> (u16, Value) {
    let boundary = "----framelink-test-boundary-7d3f";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes());
    }
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (status, _, out) = http(port, "POST", "/api/jobs", &[("Content-Type", &format!("multipart/form-data; boundary={boundary}"))], &body);
    (status, serde_json::from_slice(&out).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out).into_owned())))
}

fn job(console: &Daemon, id: &str) -> Value {
    let (status, _, body) = http(console.port, "GET", &format!("/api/jobs/{id}"), &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn wait_job(console: &Daemon, id: &str, what: &str, timeout: Duration, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let j = job(console, id);
        if cond(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {j}\nconsole log:\n{}", console.tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The downloaded result, decoded.
fn result(console: &Daemon, id: &str) -> Img {
    let (status, head, body) = http(console.port, "GET", &format!("/api/jobs/{id}/result"), &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(head.to_ascii_lowercase().contains("content-type: image/png"), "{head}");
    let img = image::load_from_memory_with_format(&body, image::ImageFormat::Png).unwrap();
    match img.color() {
        image::ColorType::L8 => Img::new(img.width(), img.height(), 1, img.into_luma8().into_raw()),
        _ => Img::new(img.width(), img.height(), 3, img.into_rgb8().into_raw()),
    }
}

struct Topics {
    frames: String,
    tiles: String,
    results: String,
    jobs: String,
    group: String,
}

impl Topics {
    fn new(what: &str) -> Self {
        Topics { frames: rand_topic(&format!("{what}-frames")), tiles: rand_topic(&format!("{what}-tiles")), results: rand_topic(&format!("{what}-tres")), jobs: rand_topic(&format!("{what}-jobs")), group: rand_topic(&format!("{what}-group")) }
    }

    fn console(&self, b: &Broker, dir: &std::path::Path, extra: &str) -> Daemon {
        let body = format!(
            "{}\n[lag]\ngroup = \"\"\n[jobs]\ntiles_topic = {:?}\nresults_topic = {:?}\njobs_topic = {:?}\npartitions = 4\n{extra}",
            kafka_toml(&b.plaintext()),
            self.tiles,
            self.results,
            self.jobs
        );
        let mut c = Daemon::console(CONSOLE, dir, &body, "");
        c.start();
        c.wait_for("the jobs read back", Duration::from_secs(30), |c| c.healthz()["jobs"]["restored"] == true);
        c
    }

    fn worker(&self, b: &Broker, dir: &std::path::Path, id: &str) -> Daemon {
        let body = format!(
            "{}\n[consumer]\ngroup_id = {:?}\ntopics = [{:?}]\nsession_timeout_ms = 6000\n[worker]\nid = {id:?}\nthreads = 1\n[tiles]\nenabled = true\ntopic = {:?}\nresults_topic = {:?}\njobs_topic = {:?}\n[heartbeat]\nheartbeat_s = 0\n",
            kafka_toml(&b.plaintext()),
            self.group,
            self.frames,
            self.tiles,
            self.results,
            self.jobs
        );
        let mut w = Daemon::worker(&sibling_binary("framelink-worker"), dir, &body);
        w.start();
        w
    }
}

#[test]
fn j1_a_4096_image_is_stitched_bit_identical_through_a_killed_worker_and_a_restarted_console() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = Topics::new("j1");
    rt.block_on(b.create_topic(&t.frames, 1)).unwrap();
    let (cdir, w1dir, w2dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut console = t.console(b, cdir.path(), "");
    let mut w1 = t.worker(b, w1dir.path(), "jobs-w1");
    let mut w2 = t.worker(b, w2dir.path(), "jobs-w2");

    let source = mosaic(4096);
    let spec = "blur:1.5,sobel";
    let (status, created) = upload(console.port, &png(&source), "mosaic.png", &[("pipeline", spec), ("tile", "256")]);
    assert_eq!(status, 202, "{created}");
    assert_eq!((created["width"].as_u64(), created["height"].as_u64(), created["tiles"].as_u64()), (Some(4096), Some(4096), Some(256)), "{created}");
    let id = created["job_id"].as_str().unwrap().to_owned();

    // A worker dies mid-job (SIGKILL: its tiles in flight are neither committed nor published).
    wait_job(&console, &id, "the first tiles", Duration::from_secs(120), |j| j["done"].as_u64() >= Some(20));
    w1.kill();
    // The console dies mid-job too, and comes back: the job's record and its results so far
    // are read back from Kafka.
    let before = wait_job(&console, &id, "more tiles", Duration::from_secs(120), |j| j["done"].as_u64() >= Some(60) && j["status"] == "running");
    assert!(before["done"].as_u64() < Some(256), "the job must still be running when the console is killed: {before}");
    console.kill();
    console.start();
    console.wait_for("the jobs read back", Duration::from_secs(30), |c| c.healthz()["jobs"]["restored"] == true);
    let done = wait_job(&console, &id, "the job to finish", Duration::from_secs(240), |j| j["status"] != "running");
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!((done["done"].as_u64(), done["failed"].as_u64()), (Some(256), Some(0)));

    let whole = Pipeline::parse(spec).unwrap().apply(source).unwrap();
    let stitched = result(&console, &id);
    assert_eq!((stitched.width, stitched.height, stitched.channels), (4096, 4096, 1));
    let differing = stitched.data.iter().zip(&whole.data).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "the stitched result differs from the whole-image run in {differing} pixels");
    // JPEG on request.
    let (status, head, jpeg) = http(console.port, "GET", &format!("/api/jobs/{id}/result"), &[("Accept", "image/jpeg")], b"");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: image/jpeg") && jpeg.starts_with(&[0xFF, 0xD8]), "{head}");
    // Listed, counted, healthy.
    let (_, _, list) = http(console.port, "GET", "/api/jobs", &[], b"");
    let list: Value = serde_json::from_slice(&list).unwrap();
    assert!(list.as_array().unwrap().iter().any(|j| j["job_id"] == id.as_str()), "{list}");
    let h = console.healthz();
    assert_eq!(h["jobs"]["by_status"]["done"], 1, "{h}");
    assert!(console.metric("job_tiles_stitched_total", &[]) >= 256.0);
    assert!(w2.metric("tiles_processed_total", &[]) > 0.0);
    w2.stop();
    console.stop();
}

#[test]
fn j2_bad_uploads_are_refused_naming_the_cause_and_a_cancelled_jobs_tiles_are_skipped() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = Topics::new("j2");
    rt.block_on(b.create_topic(&t.frames, 1)).unwrap();
    let (cdir, wdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut console = t.console(b, cdir.path(), "max_upload_bytes = 4000000\nmax_pixels = 4000000\n");
    let good = png(&mosaic(700));
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("truncated PNG", good[..good.len() / 2].to_vec(), "blur:1", 400, "truncated or corrupt"),
        ("pixel bomb", bomb(&good, 100_000, 100_000), "blur:1", 413, "jobs.max_pixels"),
        ("text file", b"just some text, not an image\n".to_vec(), "blur:1", 415, "upload a PNG, JPEG or TIFF"),
        ("over the upload limit", vec![0x89; 4_200_000], "blur:1", 413, "jobs.max_upload_bytes = 4000000"),
        ("resize", good.clone(), "resize:100x100", 400, "cannot be tiled exactly"),
        ("unknown op", good.clone(), "blurr:1", 400, "unknown op"),
        ("crop outside", good.clone(), "crop:100x100+650+0", 400, "outside the image"),
    ];
    for (what, file, spec, want, needle) in cases {
        let (status, body) = upload(console.port, &file, "x.png", &[("pipeline", spec)]);
        assert_eq!(status, want, "{what}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains(needle)), "{what}: {body}");
    }
    // A tile too large for a record under Kafka's default limit is refused, naming the size
    // that fits.
    let (status, body) = upload(console.port, &good, "x.png", &[("pipeline", "blur:2"), ("tile", "1024")]);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("jobs.max_record_bytes"), "{body}");
    // ... and tiles so small for their halo that they would carry the image many times over.
    let (status, body) = upload(console.port, &good, "x.png", &[("pipeline", "blur:5"), ("tile", "16")]);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("use tile ≥"), "{body}");

    // Nothing else broke. A job cancelled before any worker runs: its tiles are skipped.
    let (status, cancelled) = upload(console.port, &good, "x.png", &[("pipeline", "sharpen"), ("tile", "128")]);
    assert_eq!(status, 202, "{cancelled}");
    let cid = cancelled["job_id"].as_str().unwrap().to_owned();
    wait_job(&console, &cid, "queued", Duration::from_secs(30), |j| j["status"] == "running");
    let (status, _, body) = http(console.port, "DELETE", &format!("/api/jobs/{cid}"), &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(job(&console, &cid)["status"], "cancelled");
    let (status, _, _) = http(console.port, "DELETE", &format!("/api/jobs/{cid}"), &[("Origin", "https://elsewhere.example")], b"");
    assert_eq!(status, 403, "a page on another site may not change jobs");
    let (status, _, body) = http(console.port, "GET", &format!("/api/jobs/{cid}/result"), &[], b"");
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));

    let (status, ok) = upload(console.port, &good, "x.png", &[("pipeline", "grayscale,sharpen"), ("tile", "200")]);
    assert_eq!(status, 202, "{ok}");
    let id = ok["job_id"].as_str().unwrap().to_owned();
    let mut w = t.worker(b, wdir.path(), "jobs-w3");
    let done = wait_job(&console, &id, "the good job", Duration::from_secs(120), |j| j["status"] != "running" && j["status"] != "queuing");
    assert_eq!(done["status"], "done", "{done}");
    let decoded = image::load_from_memory(&good).unwrap().into_rgb8();
    let whole = Pipeline::parse("grayscale,sharpen").unwrap().apply(Img::new(700, 700, 3, decoded.into_raw())).unwrap();
    assert!(result(&console, &id) == whole, "the good job is bit-identical");
    let skipped = cancelled["tiles"].as_f64().unwrap();
    w.wait_for("the cancelled job's tiles skipped", Duration::from_secs(30), |w| w.metric("tiles_skipped_total", &["reason=\"job_cancelled\""]) >= skipped);
    assert_eq!(w.healthz()["tiles"]["skipped"]["job_cancelled"].as_f64(), Some(skipped));
    assert_eq!(console.metric("job_results_ignored_total", &[]), 0.0, "no result of the cancelled job came back");
    w.stop();
    console.stop();
}

/// `png` with its header rewritten to claim `w`×`h` (CRC fixed, so only the size is wrong).
fn bomb(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut b = png.to_vec();
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let mut c = 0xFFFF_FFFFu32;
    for &x in &b[12..29] {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    b[29..33].copy_from_slice(&(!c).to_be_bytes());
    b
}
