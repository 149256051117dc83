//! The CLI through `--json` against `comfyrelay dev`: run, watch across a cut connection, cancel, a
//! failing job, an invalid request, an unreachable server, and its independence from server settings.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::helpers::{Dev, Proxy, assert_gap_free, comfyrelay, run};

#[test]
fn run_json_reports_every_event_once_and_saves_the_outputs() {
    let dev = Dev::start(&["--comfy-port", "0"]);
    let image = dev.image("in.png", 1);
    let out = run(dev.cli().args(["run", "scale-blur"]).arg(&image).args([
        "--param",
        "width=12",
        "--param",
        "height=8",
        "--param",
        "upscale_method=area",
        "--param",
        "sigma=0.5",
        "--out",
        "results",
        "--json",
    ]));
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = out.json();
    assert_eq!(lines[0]["type"], "job");
    assert_eq!(lines[0]["inputs"]["width"], "12");
    let events = out.events();
    assert_gap_free(&events);
    assert_eq!(events.last().map(|e| e["kind"].clone()), Some("succeeded".into()));
    let saved: Vec<_> = lines.iter().filter(|v| v["type"] == "saved").collect();
    assert_eq!(saved.len(), 1, "{out:?}");
    let path = dev.dir.path().join(saved[0]["path"].as_str().expect("path"));
    let img = image::open(&path).expect("decode output");
    assert_eq!((img.width(), img.height()), (12, 8));
}

/// Reads a child's stdout lines as they come.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn watch_resumes_after_a_cut_connection_with_no_duplicate_and_no_gap() {
    // Slow enough that the cut lands mid-job: 4 nodes x 400 ms, 4 progress steps each.
    let dev = Dev::start(&["--comfy-port", "0", "--node-delay", "400ms", "--progress-steps", "4"]);
    let image = dev.image("in.png", 2);
    let submitted = run(dev.cli().args(["submit", "invert"]).arg(&image));
    assert_eq!(submitted.code, Some(0), "{submitted:?}");
    let job = submitted.stdout.trim().to_string();

    let proxy = Proxy::start(dev.addr);
    let mut watch = dev
        .cli()
        .args(["watch", &job, "--json", "--server", &format!("http://{}", proxy.addr)])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn watch");
    let rx = lines_of(&mut watch);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    let mut cut = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else { break };
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        if !cut && value["kind"] == "progress" {
            proxy.cut();
            cut = true;
        }
        lines.push(value);
    }
    let status = watch.wait().expect("watch exits");
    assert!(cut, "the job must report progress: {lines:?}");
    assert_eq!(status.code(), Some(0), "{lines:?}");
    assert!(lines.iter().any(|l| l["type"] == "reconnecting"), "the cut must be noticed: {lines:?}");
    assert!(proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2, "watch must reconnect");
    let seen: Vec<serde_json::Value> = lines.into_iter().filter(|l| l["type"] == "event").collect();
    assert_gap_free(&seen);
    assert_eq!(seen.last().map(|e| e["kind"].clone()), Some("succeeded".into()));

    // The same events as a replay of the whole log.
    let replay = run(dev.cli().args(["watch", &job, "--json"]));
    assert_eq!(replay.code, Some(0), "{replay:?}");
    let sequences = |events: &[serde_json::Value]| -> Vec<(u64, String)> {
        events.iter().map(|e| (e["sequence"].as_u64().unwrap_or(0), e["kind"].to_string())).collect()
    };
    assert_eq!(sequences(&seen), sequences(&replay.events()));
}

#[test]
fn cancel_ends_a_running_job_and_watch_exits_1() {
    let dev = Dev::start(&["--comfy-port", "0", "--node-delay", "3s"]);
    let image = dev.image("in.png", 3);
    let submitted = run(dev.cli().args(["submit", "invert", "--json"]).arg(&image));
    assert_eq!(submitted.code, Some(0), "{submitted:?}");
    let job = submitted.json()[0]["id"].as_str().expect("id").to_string();

    // Follow it; once a node executes, cancel, so ComfyUI is interrupted rather than the queue emptied.
    let mut watch =
        dev.cli().args(["watch", &job, "--json"]).stdout(Stdio::piped()).spawn().expect("spawn watch");
    let rx = lines_of(&mut watch);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut events = Vec::new();
    let mut cancelled = None;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        if cancelled.is_none() && value["kind"] == "node_started" {
            cancelled = Some(run(dev.cli().args(["cancel", &job, "--reason", "changed my mind", "--json"])));
        }
        events.push(value);
    }
    let status = watch.wait().expect("watch exits");
    let cancelled = cancelled.expect("a node started");
    assert_eq!(cancelled.code, Some(0), "{cancelled:?}");
    assert_eq!(cancelled.json()[0]["id"], job.as_str());
    assert_eq!(status.code(), Some(1), "a cancelled job exits 1: {events:?}");
    assert_gap_free(&events);
    let last = events.last().expect("events");
    assert_eq!(
        (last["kind"].as_str(), last["reason"].as_str()),
        (Some("cancelled"), Some("changed my mind"))
    );
    let human = run(dev.cli().args(["get", &job]));
    assert!(human.stdout.contains("state     cancelled"), "{human:?}");
}

#[test]
fn a_failing_job_exits_1_with_its_reason_and_node_errors() {
    let dev = Dev::start(&["--comfy-port", "0"]);
    let image = dev.image("in.png", 4);
    // 5000 x 5000 is beyond what the emulated ComfyUI can allocate: the ImageScale node fails.
    let out = run(dev.cli().args(["run", "scale-blur"]).arg(&image).args([
        "-p",
        "width=5000",
        "-p",
        "height=5000",
        "--json",
    ]));
    assert_eq!(out.code, Some(1), "{out:?}");
    let events = out.events();
    let last = events.last().expect("events");
    assert_eq!(last["kind"], "failed");
    assert_eq!(last["error"]["reason"], "execution");
    assert_eq!(last["error"]["node_errors"][0]["class_type"], "ImageScale");
    assert!(!out.json().iter().any(|l| l["type"] == "saved"));

    let human = run(dev.cli().args(["run", "scale-blur"]).arg(&image).args([
        "-p",
        "width=5000",
        "-p",
        "height=5000",
    ]));
    assert_eq!(human.code, Some(1));
    assert!(human.stderr.contains("failed (execution)") && human.stderr.contains("ImageScale"), "{human:?}");
}

#[test]
fn an_invalid_request_exits_2_with_the_field_violations_decoded() {
    let dev = Dev::start(&["--comfy-port", "0"]);
    let image = dev.image("in.png", 5);
    let args = ["-p", "blur_radius=99", "-p", "sigma=100"];
    let out = run(dev.cli().args(["run", "scale-blur"]).arg(&image).args(args));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("InvalidArgument"), "{out:?}");
    assert!(out.stderr.contains("field `parameters[blur_radius]`: 99 is out of range"), "{out:?}");
    assert!(out.stderr.contains("field `parameters[sigma]`"), "{out:?}");
    assert!(out.stderr.contains("reason: INVALID_ARGUMENT (comfyrelay.dev)"), "{out:?}");

    let out = run(dev.cli().args(["submit", "scale-blur"]).arg(&image).args(args).arg("--json"));
    assert_eq!(out.code, Some(2), "{out:?}");
    let error = &out.json()[0];
    assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some("InvalidArgument")));
    assert_eq!(error["details"]["field_violations"][0]["field"], "parameters[blur_radius]");
    assert_eq!(error["details"]["error_info"]["reason"], "INVALID_ARGUMENT");

    // Found before anything is submitted: usage, 64.
    let out = run(dev.cli().args(["submit", "scale-blur"]).arg(&image).args(["-p", "hieght=4"]));
    assert_eq!(out.code, Some(64), "{out:?}");
    assert!(out.stderr.contains("no input `hieght`") && out.stderr.contains("height"), "{out:?}");
    let out = run(dev.cli().args(["submit", "scale-blur"]).arg(&image).args(["-p", "width=wide"]));
    assert_eq!(out.code, Some(64), "{out:?}");
    let out = run(dev.cli().args(["get", "a", "b", "c"]));
    assert_eq!(out.code, Some(64), "{out:?}");
    let out = run(dev.cli().args(["get", "01234567-89ab-7def-8123-456789abcdef"]));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("NotFound"), "{out:?}");
}

#[test]
fn an_unreachable_server_exits_2_naming_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    // The listener is dropped: nothing listens on `port` now.
    let server = format!("http://127.0.0.1:{port}");
    let out = run(comfyrelay()
        .args(["get", "01234567-89ab-7def-8123-456789abcdef", "--connect-timeout", "5s"])
        .env("COMFYRELAY_SERVER", &server));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains(&format!("cannot reach the comfyrelay server at {server}")), "{out:?}");
    let out = run(comfyrelay().args(["workflows", "--json", "--server", &server]));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert_eq!(out.json()[0]["kind"], "unreachable");
}

#[test]
fn client_commands_ignore_server_settings_and_never_print_the_api_key() {
    let dev = Dev::start(&["--comfy-port", "0"]);
    let key = "k-do-not-print-me";
    let out = run(dev
        .cli()
        .args(["workflows", "--json"])
        .env("COMFYRELAY_API_KEY", key)
        .env("COMFYRELAY_GRPC__MAX_MESSAGE_BYTES", "not-a-number"));
    assert_eq!(out.code, Some(0), "a client must not load the server's config: {out:?}");
    let names: Vec<String> =
        out.json().iter().map(|w| w["name"].as_str().unwrap_or("").to_string()).collect();
    assert!(names.contains(&"invert".to_string()) && names.contains(&"scale-blur".to_string()), "{names:?}");
    for args in [&["run", "--help"][..], &["get", "not-a-uuid"], &["machines"]] {
        let out = run(dev.cli().args(args).env("COMFYRELAY_API_KEY", key));
        assert!(!out.stdout.contains(key) && !out.stderr.contains(key), "{args:?} printed the key: {out:?}");
    }
    let machines = run(dev.cli().args(["machines", "--json"]));
    assert_eq!(machines.json()[0]["id"], "emulator", "{machines:?}");
    // And the server ignores the client's variables.
    let dev2 =
        Dev::start_with(&["--comfy-port", "0"], &[("COMFYRELAY_SERVER", "x"), ("COMFYRELAY_API_KEY", key)]);
    assert!(!dev2.printed().contains(key));
}

#[test]
fn watch_gives_up_when_the_stream_stays_broken_and_exits_2() {
    let dev = Dev::start(&["--comfy-port", "0", "--node-delay", "2s"]);
    let image = dev.image("in.png", 6);
    let submitted = run(dev.cli().args(["submit", "invert"]).arg(&image));
    assert_eq!(submitted.code, Some(0), "{submitted:?}");
    let job = submitted.stdout.trim().to_string();
    let proxy = Proxy::start(dev.addr);
    let server = format!("http://{}", proxy.addr);
    let mut watch = dev
        .cli()
        .args(["watch", &job, "--json", "--reconnect-for", "1s", "--server", &server])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn watch");
    let rx = lines_of(&mut watch);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    let mut proxy = Some(proxy);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        // After the first event the proxy goes away for good: nothing listens there any more.
        drop(proxy.take());
        lines.push(serde_json::from_str::<serde_json::Value>(&line).expect("JSON line"));
    }
    let status = watch.wait().expect("watch exits");
    assert_eq!(status.code(), Some(2), "{lines:?}");
    assert!(lines.iter().any(|l| l["type"] == "reconnecting"), "{lines:?}");
    let last = lines.last().expect("lines");
    assert_eq!(
        (last["type"].as_str(), last["code"].as_str()),
        (Some("error"), Some("Unavailable")),
        "{lines:?}"
    );
}

/// PEM certificate and key of a leaf signed by `issuer` (`server`: for localhost/127.0.0.1, else a client
/// named `cn`).
fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, server: bool, cn: &str) -> (String, String) {
    let names = if server { vec!["localhost".to_string(), "127.0.0.1".to_string()] } else { Vec::new() };
    let mut params = rcgen::CertificateParams::new(names).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![if server {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = rcgen::KeyPair::generate().expect("key");
    (params.signed_by(&key, issuer).expect("sign").pem(), key.serialize_pem())
}

#[test]
fn the_cli_reaches_a_tls_server_with_its_ca_and_a_client_certificate() {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key")).expect("CA");
    let tls = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, text: &str| {
        let path = tls.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8").to_string()
    };
    let ca_file = file("ca.crt", &ca.pem());
    let (cert, key) = leaf(&ca, true, "localhost");
    let (client_cert, client_key) = leaf(&ca, false, "team-a-ci");
    let (cert, key) = (file("tls.crt", &cert), file("tls.key", &key));
    let (client_cert, client_key) = (file("client.crt", &client_cert), file("client.key", &client_key));
    let dev = Dev::start_with(
        &["--comfy-port", "0"],
        &[
            ("COMFYRELAY_GRPC__TLS__CERT_FILE", &cert),
            ("COMFYRELAY_GRPC__TLS__KEY_FILE", &key),
            ("COMFYRELAY_GRPC__TLS__CLIENT_CA_FILE", &ca_file),
        ],
    );
    assert!(dev.server.starts_with("https://"), "{}", dev.server);

    let out = run(dev.cli().args(["workflows", "--json", "--ca-cert", &ca_file]).args([
        "--client-cert",
        &client_cert,
        "--client-key",
        &client_key,
    ]));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.json().iter().any(|w| w["name"] == "invert"), "{out:?}");
    // The variables do the same, and the server's own config ignores them.
    let out = run(dev
        .cli()
        .args(["workflows", "--json"])
        .env("COMFYRELAY_CA_CERT", &ca_file)
        .env("COMFYRELAY_CLIENT_CERT", &client_cert)
        .env("COMFYRELAY_CLIENT_KEY", &client_key));
    assert_eq!(out.code, Some(0), "{out:?}");

    // The public roots do not know the test CA; a plaintext client is not answered.
    let out = run(dev.cli().args(["workflows", "--json", "--connect-timeout", "5s"]));
    assert_eq!(out.code, Some(2), "{out:?}");
    let plain = dev.server.replacen("https://", "http://", 1);
    let out = run(dev.cli().args(["workflows", "--json", "--connect-timeout", "5s", "--server", &plain]));
    assert_eq!(out.code, Some(2), "{out:?}");
}

/// A PNG of `w`×`h` pseudo-random pixels: about 3 bytes a pixel, however it is inverted.
fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let [r, g, b, ..] = state.to_le_bytes();
        image::Rgb([r, g, b])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

#[test]
fn a_download_cut_midway_resumes_at_the_byte_it_reached_and_saves_the_whole_file() {
    let dev = Dev::start(&["--comfy-port", "0"]);
    std::fs::write(dev.dir.path().join("noise.png"), noise_png(1024, 768)).expect("write image");
    let ran = run(dev.cli().args(["run", "invert", "noise.png", "--out", "first", "--json"]));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let lines = ran.json();
    let job = lines[0]["id"].as_str().expect("job id").to_string();
    let saved = lines.iter().find(|l| l["type"] == "saved").expect("saved");
    let whole = std::fs::read(dev.dir.path().join(saved["path"].as_str().expect("path"))).expect("read");
    assert!(whole.len() > 2 << 20, "an output of {} bytes", whole.len());

    // The first connection is cut after 1 MiB from the server: midway through the download.
    let proxy = Proxy::cutting_first_after(dev.addr, 1 << 20);
    let server = format!("http://{}", proxy.addr);
    let out = run(dev.cli().args(["download", &job, "--out", "again", "--json", "--server", &server]));
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = out.json();
    let resumed: Vec<_> = lines.iter().filter(|l| l["type"] == "reconnecting").collect();
    assert_eq!(resumed.len(), 1, "{lines:?}");
    assert_eq!(resumed[0]["call"], "DownloadOutput", "{lines:?}");
    let offset = resumed[0]["offset"].as_u64().expect("offset");
    assert!(offset > 0 && offset < whole.len() as u64, "resumed at {offset} of {}", whole.len());
    assert!(proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2, "a second connection");
    let saved = lines.iter().find(|l| l["type"] == "saved").expect("saved");
    let again = std::fs::read(dev.dir.path().join(saved["path"].as_str().expect("path"))).expect("read");
    assert!(
        again == whole,
        "the resumed file is the whole output ({} of {} bytes)",
        again.len(),
        whole.len()
    );
    assert_eq!(std::fs::read_dir(dev.dir.path().join("again")).expect("again/").count(), 1, "no part file");
}

#[test]
fn a_download_that_runs_past_the_size_the_server_announced_stops_and_saves_nothing() {
    // A server that announces 3000 bytes and would stream a megabyte (or, unbounded, fill the disk).
    let liar = crate::helpers::LyingServer::start(3000, 1 << 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(comfyrelay()
        .args(["download", "01234567-89ab-7def-8123-456789abcdef", "--json", "--retry-for", "0s", "--out"])
        .arg(dir.path())
        .env("COMFYRELAY_SERVER", &liar.url));
    assert_eq!(out.code, Some(2), "{out:?}");
    let lines = out.json();
    let error = lines.iter().find(|v| v["type"] == "error").expect("an error line");
    assert_eq!(error["kind"], "protocol", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("more than the 3000 bytes the server announced")),
        "{error}"
    );
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).expect("read dir").flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "neither the file nor a part file is left: {left:?}");
}
