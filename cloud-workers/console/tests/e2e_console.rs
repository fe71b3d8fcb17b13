//! The console end to end: fed by a real agent and a real worker through the real broker, and
//! looked at in a real browser (Debian's headless `chromium`, driven over the DevTools
//! protocol; `scripts/bootstrap` installs it). Assertions are on the page's DOM; screenshots are
//! kept under `target/tmp/console-screenshots/` as test artifacts.
//!
//! Also: the JSON API, the bearer token (header, login cookie, 401s, an open `/healthz`), and
//! HTTPS.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use framelink_testkit::daemon::{Daemon, kafka_toml};
use framelink_testkit::{Broker, init_tracing, rand_topic};
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::Value;

const CONSOLE: &str = env!("CARGO_BIN_EXE_framelink-console");

/// Tests here start daemons that share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn sibling_binary(name: &str) -> String {
    let p = PathBuf::from(CONSOLE).parent().unwrap().join(name);
    assert!(p.exists(), "{} is missing: build the workspace's binaries (`cargo test --workspace --no-run`)", p.display());
    p.display().to_string()
}

fn chromium() -> PathBuf {
    let p = PathBuf::from(std::env::var("FRAMELINK_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(p.exists(), "{} is missing: `apt-get install chromium` (scripts/bootstrap does), or set FRAMELINK_CHROMIUM", p.display());
    p
}

fn shots_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A headless browser on one page, collecting the page's console errors and exceptions.
struct Page {
    _browser: Browser,
    tab: Arc<Tab>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Page {
    fn open(url: &str) -> Page {
        let profile = tempfile::tempdir().unwrap();
        let browser = Browser::new(LaunchOptions {
            headless: true,
            sandbox: false,
            path: Some(chromium()),
            window_size: Some((1400, 1500)),
            user_data_dir: Some(profile.keep()),
            idle_browser_timeout: Duration::from_secs(300),
            ..LaunchOptions::default()
        })
        .expect("start chromium");
        let tab = browser.new_tab().unwrap();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        tab.enable_log().unwrap();
        tab.enable_runtime().unwrap();
        tab.add_event_listener(Arc::new(move |e: &Event| {
            let text = match e {
                Event::RuntimeExceptionThrown(x) => {
                    let d = &x.params.exception_details;
                    Some(format!("exception at {:?}:{}: {:?}", d.url, d.line_number, d.exception.as_ref().and_then(|e| e.description.clone())))
                }
                Event::LogEntryAdded(x) if format!("{:?}", x.params.entry.level) == "Error" => Some(format!("log: {} {:?}", x.params.entry.text, x.params.entry.url)),
                Event::RuntimeConsoleAPICalled(x) if format!("{:?}", x.params.Type) == "Error" => Some(format!("console.error: {:?}", x.params.args)),
                _ => None,
            };
            if let Some(t) = text {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(t);
            }
        }))
        .unwrap();
        tab.navigate_to(url).unwrap().wait_until_navigated().unwrap();
        Page { _browser: browser, tab, errors }
    }

    fn eval(&self, js: &str) -> Value {
        self.tab.evaluate(js, false).unwrap_or_else(|e| panic!("evaluating {js}: {e}")).value.unwrap_or(Value::Null)
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true).unwrap();
        let p = shots_dir().join(name);
        std::fs::write(&p, png).unwrap();
        p
    }

    /// Polls `js` until it returns something truthy; on timeout a screenshot and the page's
    /// state go into the panic message.
    fn wait(&self, what: &str, timeout: Duration, js: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(js);
            if !(v.is_null() || v == Value::Bool(false) || v == Value::from(0)) {
                return v;
            }
            if Instant::now() > deadline {
                let shot = self.screenshot(&format!("timeout-{}.png", what.replace(' ', "-")));
                let summary = self.eval("document.querySelector('header').innerText + ' | cameras: ' + [...document.querySelectorAll('#cameras .card')].map(c => c.dataset.id + '=' + c.dataset.status).join(',') + ' | workers: ' + [...document.querySelectorAll('#workers tr')].map(r => r.dataset.id + '=' + r.dataset.status).join(',')");
                panic!("timed out waiting for {what} ({js} → {v}); page: {summary}; screenshot {}; errors: {:?}", shot.display(), self.errors.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

const LIVE_THUMBS: &str = "[...document.querySelectorAll('#cameras .card')].filter(c => c.dataset.status === 'live' && c.querySelector('img') && c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0).length";
const SEQS: &str = "[...document.querySelectorAll('#cameras .card img')].map(i => i.dataset.seq + ':' + i.complete + ':' + i.naturalWidth).join(',')";
const LAG: &str = "Number(document.getElementById('lag-total').textContent)";

fn row_status(table: &str, id: &str) -> String {
    format!("(document.querySelector('#{table} tr[data-id=\"{id}\"]') || {{dataset: {{}}}}).dataset.status || null")
}

#[test]
fn c1_the_dashboard_shows_the_fleet_live_in_a_browser() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (frames, results, events, dlq, beats) = (rand_topic("c1-in"), rand_topic("c1-out"), rand_topic("c1-ev"), rand_topic("c1-dlq"), rand_topic("c1-beats"));
    for (t, p) in [(&frames, 2), (&results, 2), (&events, 1), (&dlq, 1)] {
        rt.block_on(b.create_topic(t, p)).unwrap();
    }
    let group = rand_topic("c1-group");
    let heartbeat = format!("[heartbeat]\nheartbeat_s = 1\ntopic = {beats:?}\n");
    let (tiles, tile_results, jobs) = (rand_topic("c1-tiles"), rand_topic("c1-tres"), rand_topic("c1-jobs"));

    // The console first: it creates the heartbeats topic, compacted.
    let cdir = tempfile::tempdir().unwrap();
    let console_body = format!(
        "{}\n[topics]\nheartbeats = {beats:?}\nresults = {results:?}\nevents = {events:?}\ndlq = {dlq:?}\n[lag]\ngroup = {group:?}\ntopics = [{frames:?}]\ninterval_s = 1\n[jobs]\ntiles_topic = {tiles:?}\nresults_topic = {tile_results:?}\njobs_topic = {jobs:?}\npartitions = 2\n",
        kafka_toml(&b.plaintext())
    );
    let mut console = Daemon::console(CONSOLE, cdir.path(), &console_body, "stale_after_beats = 2\nthumbnail_refresh_s = 1\npush_interval_ms = 500\n");
    console.start();

    let wdir = tempfile::tempdir().unwrap();
    let worker_body = format!(
        "{}\n[consumer]\ngroup_id = {group:?}\ntopics = [{frames:?}]\nsession_timeout_ms = 6000\n[output]\nresults_topic = {results:?}\nevents_topic = {events:?}\ndlq_topic = {dlq:?}\n[worker]\nid = \"w-console\"\npipeline = \"resize:320x180\"\nthreads = 2\n[motion]\nenabled = true\n{heartbeat}[tiles]\nenabled = true\ntopic = {tiles:?}\nresults_topic = {tile_results:?}\njobs_topic = {jobs:?}\n",
        kafka_toml(&b.plaintext())
    );
    let mut worker = Daemon::worker(&sibling_binary("framelink-worker"), wdir.path(), &worker_body);
    worker.start();
    let adir = tempfile::tempdir().unwrap();
    let agent_body = format!(
        "[device]\nid = \"site-9\"\n{}\n[[cameras]]\nid = \"gate\"\nsynthetic = {{ width = 640, height = 360, fps = 8 }}\n[[cameras]]\nid = \"dock\"\nsynthetic = {{ width = 640, height = 360, fps = 8 }}\n[spool]\ndir = {:?}\n[forwarder]\ntopic = {frames:?}\n{heartbeat}",
        kafka_toml(&b.plaintext()),
        adir.path().join("spool").display().to_string(),
    );
    let mut agent = Daemon::agent(&sibling_binary("framelink-agent"), adir.path(), &agent_body);
    agent.start();

    let page = Page::open(&format!("http://127.0.0.1:{}/", console.port));
    // Both cameras live, with thumbnails that loaded.
    page.wait("two live cameras with thumbnails", Duration::from_secs(90), &format!("{LIVE_THUMBS} === 2"));
    page.wait("the device live", Duration::from_secs(10), &format!("{} === 'live'", row_status("devices", "site-9")));
    page.wait("the worker live", Duration::from_secs(10), &format!("{} === 'live'", row_status("workers", "w-console")));
    let ids = page.eval("[...document.querySelectorAll('#cameras .card')].map(c => c.dataset.id).sort().join(',')");
    assert_eq!(ids, "site-9/dock,site-9/gate");
    // Thumbnails change over time (a newer result, loaded).
    let before = page.eval(SEQS);
    page.wait("newer thumbnails", Duration::from_secs(20), &format!("(() => {{ const now = {SEQS}; return now !== {before} && {LIVE_THUMBS} === 2; }})()"));
    page.screenshot("1-live.png");

    // The API says the same.
    let fleet = console.get_json("/api/fleet");
    assert_eq!(fleet["devices"][0]["id"], "site-9", "{fleet}");
    assert_eq!(fleet["devices"][0]["link"], "up");
    assert_eq!(fleet["workers"][0]["pipeline"], "resize:320x180");
    assert_eq!(fleet["cameras"].as_array().unwrap().len(), 2);
    for c in fleet["cameras"].as_array().unwrap() {
        assert!(c["thumbnail"].as_str().unwrap().starts_with("/thumbs/site-9/"), "{c}");
        assert_eq!(c["result"]["width"], 320, "{c}");
    }
    // The send rate of the 8 fps cameras, from the agent's heartbeats (1 s windows: one window
    // on a loaded machine can miss acknowledgements, so the rate is looked at until it shows).
    console.wait_for("both cameras' fps_sent over 4 (8 fps cameras)", Duration::from_secs(30), |c| {
        let fleet = c.get_json("/api/fleet");
        let cams = fleet["cameras"].as_array().unwrap();
        cams.len() == 2 && cams.iter().all(|c| c["fps_sent"].as_f64().unwrap_or(0.0) > 4.0)
    });

    // A corrupt frame: the worker dead-letters it, the page shows its reason.
    let mut bad = framelink_testkit::test_meta("site-9", "gate", 1_000_000);
    (bad.width, bad.height) = (640, 360);
    rt.block_on(framelink_testkit::Producer::new(&b.plaintext()).unwrap().send_frame(&frames, &bad, b"\xff\xd8 not a JPEG")).unwrap();
    let reason = page.wait("a dead letter on the page", Duration::from_secs(30), "(document.querySelector('#dlq-reasons [data-reason]') || {dataset: {}}).dataset.reason || null");
    assert_eq!(page.eval("document.getElementById('dlq-total').textContent"), "1");
    let dlq = console.get_json("/api/dead-letters");
    assert_eq!(dlq["by_reason"][reason.as_str().unwrap()], 1, "{dlq}");
    assert_eq!(dlq["recent"][0]["key"], "site-9/gate", "{dlq}");

    // A stopped worker: the lag grows on the chart, the worker goes stale.
    worker.stop();
    page.wait("the lag growing", Duration::from_secs(30), &format!("{LAG} >= 40"));
    page.wait("the worker not live", Duration::from_secs(15), &format!("['stale', 'offline'].includes({})", row_status("workers", "w-console")));
    let points = page.eval("Number(document.getElementById('lag-chart').dataset.points)").as_u64().unwrap();
    assert!(points >= 5, "the chart has the samples: {points}");
    page.screenshot("2-worker-stopped.png");
    // ... and recovers when it is back.
    worker.start();
    page.wait("the lag recovered", Duration::from_secs(60), &format!("{LAG} <= 16"));
    page.wait("the worker live again", Duration::from_secs(15), &format!("{} === 'live'", row_status("workers", "w-console")));
    page.screenshot("3-worker-back.png");

    // A large-image job through the page's form: its row shows the progress, then the result.
    // (The file goes into the form's input as a user's pick would; Chromium's DevTools file
    // chooser is refused reading files in this sandbox-less setup, so the page makes the File.)
    let coffee = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images/coffee.png")).unwrap();
    let hex: String = coffee.iter().map(|b| format!("{b:02x}")).collect();
    page.eval(&format!("(() => {{ const h = '{hex}'; const b = new Uint8Array(h.length / 2); for (let i = 0; i < b.length; i++) b[i] = parseInt(h.substr(2 * i, 2), 16); const dt = new DataTransfer(); dt.items.add(new File([b], 'coffee.png', {{ type: 'image/png' }})); document.getElementById('job-file').files = dt.files; return true; }})()"));
    page.eval("document.getElementById('job-pipeline').value = 'blur:1.5,sobel'; document.getElementById('job-tile').value = '128'; document.querySelector('#job-form button').click(); true");
    let message = page.wait("the job accepted", Duration::from_secs(20), "(document.getElementById('job-message').textContent.match(/^job \\S+: 20 tiles$/) || [null])[0]");
    let id = message.as_str().unwrap().split(' ').nth(1).unwrap().trim_end_matches(':').to_owned();
    page.wait("the job done on the page", Duration::from_secs(60), &format!("{} === 'done'", row_status("jobs", &id)));
    page.wait("the job's progress bar full", Duration::from_secs(10), &format!("(document.querySelector('#jobs tr[data-id=\"{id}\"] progress') || {{}}).value === 100"));
    assert_eq!(page.eval(&format!("document.querySelector('#jobs tr[data-id=\"{id}\"] td:nth-child(6)').textContent")), "20/20");
    assert_eq!(page.eval(&format!("document.querySelector('#jobs tr[data-id=\"{id}\"] a').getAttribute('href')")), format!("/api/jobs/{id}/result"));
    assert_eq!(console.get_json(&format!("/api/jobs/{id}"))["done"], 20);
    page.screenshot("3b-job-done.png");

    // A stopped agent: its cameras and the device go stale.
    agent.stop();
    page.wait("both cameras stale", Duration::from_secs(20), "[...document.querySelectorAll('#cameras .card')].filter(c => c.dataset.status === 'stale').length === 2");
    page.wait("the device stale", Duration::from_secs(10), &format!("{} === 'stale'", row_status("devices", "site-9")));
    page.screenshot("4-agent-stopped.png");

    // A beat the agent made just before it stopped can reach the console after the page saw
    // the device stale (a busy machine), making it live again for a moment: the metric is
    // waited for, not read once.
    console.wait_for("the stale device in /metrics", Duration::from_secs(20), |c| c.metrics().get("framelink_console_devices{state=\"stale\"}") == Some(&1.0));
    let metrics = console.metrics();
    assert!(metrics.get("framelink_console_heartbeats_total").is_some_and(|n| *n >= 10.0), "{metrics:?}");
    let errors = page.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    drop(page);

    // A restarted console knows the fleet at once: the last beats, from the compacted topic
    // (the agent is stopped: nothing new arrives).
    console.stop();
    worker.stop();
    console.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fleet = console.get_json("/api/fleet");
        let device = fleet["devices"].as_array().unwrap().iter().find(|d| d["id"] == "site-9").cloned();
        let worker_known = fleet["workers"].as_array().unwrap().iter().any(|w| w["id"] == "w-console");
        if let Some(d) = device
            && worker_known
        {
            assert_ne!(d["status"], "live", "a stopped agent's last beat is not live: {d}");
            assert_eq!(fleet["cameras"].as_array().unwrap().len(), 2, "{fleet}");
            break;
        }
        assert!(Instant::now() < deadline, "the restarted console did not rebuild the fleet from the heartbeats topic: {fleet}");
        std::thread::sleep(Duration::from_millis(300));
    }
    console.stop();
}

#[test]
fn c2_a_token_guards_everything_but_healthz_and_https_serves() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    let token = "c2-secret-token-0123456789";
    // A console reachable from other hosts refuses to start without a token...
    let config = format!("{}\n[lag]\ngroup = \"\"\n", kafka_toml(&b.plaintext()));
    let cfg = dir.path().join("public.toml");
    std::fs::write(&cfg, format!("{config}[console]\nlisten = \"0.0.0.0:0\"\n")).unwrap();
    let out = std::process::Command::new(CONSOLE).args(["check-config", "--config", cfg.to_str().unwrap()]).env_remove("FRAMELINK_CONSOLE_TOKEN").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("console.listen") && stderr.contains("token"), "{stderr}");

    // ... and with one, every route but /healthz needs it.
    let mut console = Daemon::console(CONSOLE, dir.path(), &config, "").env("FRAMELINK_CONSOLE_TOKEN", token);
    console.start();
    let (status, _) = console.request("GET", "/api/fleet", &[], "").unwrap();
    assert_eq!(status, 401);
    let (status, _) = console.request("GET", "/api/fleet", &[("Authorization", "Bearer wrong-token-0123456789")], "").unwrap();
    assert_eq!(status, 401);
    let (status, body) = console.request("GET", "/api/fleet", &[("Authorization", &format!("Bearer {token}"))], "").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(token));
    let (status, _) = console.request("GET", "/metrics", &[], "").unwrap();
    assert_eq!(status, 401);
    let (status, _) = console.request("GET", "/", &[], "").unwrap();
    assert_eq!(status, 303, "a browser goes to the login form");
    let (status, body) = console.request("GET", "/healthz", &[], "").unwrap();
    assert_eq!(status, 200, "{body}");
    // The login form sets an HttpOnly cookie that opens the page.
    let form = format!("token={token}");
    let (status, _) = console.request("POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], &form).unwrap();
    assert_eq!(status, 303);
    let (status, page) = console.request("GET", "/", &[("Cookie", &format!("framelink_console_token={token}"))], "").unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<title>framelink console</title>"));
    console.stop();

    // HTTPS: a certificate from a CA of the test's own; curl checks it against that CA.
    let ca = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "c2 test CA");
    let ca_cert = ca_params.self_signed(&ca).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let tdir = tempfile::tempdir().unwrap();
    let (ca_pem, cert_pem, key_pem) = (tdir.path().join("ca.pem"), tdir.path().join("web.pem"), tdir.path().join("web.key"));
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let tls_keys = format!("tls_certificate = {:?}\ntls_key = {:?}\n", cert_pem.display().to_string(), key_pem.display().to_string());
    let mut tls = Daemon::console(CONSOLE, tdir.path(), &config, &tls_keys);
    tls.spawn();
    let port = tls.port;
    let url = format!("https://localhost:{port}/healthz");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let out = std::process::Command::new("curl").args(["-sS", "--cacert", ca_pem.to_str().unwrap(), "--resolve", &format!("localhost:{port}:127.0.0.1"), &url]).output().unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "no HTTPS answer: {}; log:\n{}", String::from_utf8_lossy(&out.stderr), tls.tail());
        std::thread::sleep(Duration::from_millis(300));
    };
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(health["status"].is_string(), "{health}");
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    assert!(tls.request("GET", "/healthz", &[], "").is_err(), "plain HTTP must not be served on the HTTPS port");
    tls.stop();
}
