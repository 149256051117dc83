//! The web console in a real headless Chromium (issue 14), against the built binary's `comfyrelay dev`.
//!
//! The test starts `dev` (slow nodes, so progress can be watched and a connection cut mid-job) with
//! `grpc.cors_origins` naming a second loopback origin, serves the console's assets (as fetched from
//! `dev`) from that origin and from a third one off the list, and puts a TCP proxy it can cut between
//! the browser and `dev`. `drive.mjs` (playwright-core with the system's chromium) does what a person
//! would; this side checks CORS on the wire, cuts the proxy when asked, and checks the results through
//! the API: the jobs' states and the inverted pixels of the image the browser downloaded.
//!
//! Needs `chromium` (Debian's package), `node` and playwright-core in `target/ci-tools` (`.ci/run`
//! installs all three). Without them the test says it is skipped, except under `CI`: then it fails.
//! Screenshots go to `target/console/`.

#[path = "../clients/helpers.rs"]
#[expect(dead_code, reason = "shared with the clients binary, which uses the rest of it")]
mod helpers;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use helpers::{Dev, Proxy, png, repo};

/// The test images' size (big enough to see in the screenshots).
const W: u32 = 96;
const H: u32 = 64;

/// How long the whole browser session may take (a cold chromium on a loaded 2-core machine).
const DRIVE_DEADLINE: Duration = Duration::from_secs(240);

/// What the browser needs, or why it cannot run.
struct Tools {
    chromium: PathBuf,
    node: PathBuf,
    playwright: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn tools() -> Option<Tools> {
    let chromium = which("chromium").or_else(|| which("chromium-browser"));
    let node = which("node");
    let playwright = repo().join("target/ci-tools/node_modules/playwright-core");
    let missing: Vec<&str> = [
        (chromium.is_none(), "chromium (Debian package `chromium`)"),
        (node.is_none(), "node"),
        (!playwright.join("index.mjs").is_file(), "playwright-core in target/ci-tools"),
    ]
    .into_iter()
    .filter_map(|(absent, what)| absent.then_some(what))
    .collect();
    if missing.is_empty() {
        return Some(Tools { chromium: chromium?, node: node?, playwright });
    }
    let message = format!("missing {}; `.ci/run` installs them", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{message}");
    }
    eprintln!("SKIPPED the console browser test: {message}");
    None
}

/// One HTTP/1.1 exchange on a new connection: the status line and headers (lowercased names) and body.
fn http(addr: SocketAddr, request: &str) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, raw[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn preflight(server: SocketAddr, origin: &str) -> (String, Vec<(String, String)>) {
    let (status, headers, _) = http(
        server,
        &format!(
            "OPTIONS /comfyrelay.v1.JobService/ListJobs HTTP/1.1\r\nHost: {server}\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: content-type,x-grpc-web,x-user-agent,authorization\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    (status, headers)
}

/// Serves `assets` (path → content type and bytes) on `listener` until the process ends: the console's
/// own files, from another origin than comfyrelay's.
fn serve_static(listener: TcpListener, assets: Arc<Vec<(String, String, Vec<u8>)>>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let assets = assets.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let path = path.split('?').next().unwrap_or(path);
                let reply = match assets.iter().find(|(p, _, _)| p == path) {
                    Some((_, ty, body)) => {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(body);
                        r
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
                    }
                };
                let _ = conn.write_all(&reply);
            });
        }
    });
}

/// The bundled `invert`, `scale-blur` and `progress-websocket`; `invert-cloud`, `invert` with RunComfy
/// requirements, so its jobs run on the emulated RunComfy account's machines (as in the README's "RunComfy"
/// section); and `sd15-local`, which the emulated ComfyUI cannot run.
fn catalog() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (from, to) in [
        ("invert", "invert"),
        ("scale-blur", "scale-blur"),
        ("progress-websocket", "progress-websocket"),
        ("invert", "invert-cloud"),
    ] {
        let dest = dir.path().join(to);
        std::fs::create_dir_all(&dest).expect("mkdir");
        for file in ["manifest.toml", "workflow.json"] {
            std::fs::copy(repo().join("workflows").join(from).join(file), dest.join(file))
                .expect("copy workflow");
        }
    }
    // sd15-img2img without its RunComfy requirements: the emulated ComfyUI lacks its nodes, so it is refused.
    let dest = dir.path().join("sd15-local");
    std::fs::create_dir_all(&dest).expect("mkdir");
    std::fs::copy(repo().join("workflows/sd15-img2img/workflow.json"), dest.join("workflow.json"))
        .expect("copy");
    let text =
        std::fs::read_to_string(repo().join("workflows/sd15-img2img/manifest.toml")).expect("read manifest");
    let (head, rest) = text.split_once("[requirements]").expect("sd15-img2img has requirements");
    let rest = &rest[rest.find("[[").expect("inputs after the requirements")..];
    let text = format!("{head}{rest}").replace(r#"name = "sd15-img2img""#, r#"name = "sd15-local""#);
    std::fs::write(dest.join("manifest.toml"), text).expect("write manifest");
    let manifest = dir.path().join("invert-cloud/manifest.toml");
    let text = std::fs::read_to_string(&manifest)
        .expect("read manifest")
        .replace(r#"name = "invert""#, r#"name = "invert-cloud""#)
        + "\n[requirements]\nruncomfy_workflow_version_id = \"5e1f6c7a-0000-4000-8000-00000000f001\"\n";
    std::fs::write(&manifest, text).expect("write manifest");
    dir
}

fn out_dir() -> PathBuf {
    let dir = repo().join("target/console");
    std::fs::create_dir_all(&dir).expect("create target/console");
    dir
}

#[test]
fn the_console_submits_follows_resumes_and_cancels_in_chromium_and_other_origins_are_refused() {
    let Some(tools) = tools() else { return };
    let allowed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let refused = TcpListener::bind("127.0.0.1:0").expect("bind");
    let allowed_origin = format!("http://{}", allowed.local_addr().expect("addr"));
    let refused_origin = format!("http://{}", refused.local_addr().expect("addr"));
    let origins = format!(r#"["{allowed_origin}"]"#);
    let catalog = catalog();
    let dev = Dev::start_with(
        &[
            "--comfy-port",
            "0",
            "--runcomfy",
            "--runcomfy-port",
            "0",
            "--node-delay",
            "1s",
            "--progress-steps",
            "8",
        ],
        &[
            ("COMFYRELAY_GRPC__CORS_ORIGINS", origins.as_str()),
            ("COMFYRELAY_WORKFLOWS_DIR", catalog.path().to_str().expect("utf-8 path")),
        ],
    );

    let assets = Arc::new(console_assets(dev.addr));
    serve_static(allowed, assets.clone());
    serve_static(refused, assets);

    let proxy = Proxy::start(dev.addr);
    let out = out_dir();
    let images: Vec<PathBuf> = [("first.png", 1), ("second.png", 2), ("third.png", 3), ("fourth.png", 4)]
        .into_iter()
        .map(|(name, salt)| {
            let p = out.join(name);
            std::fs::write(&p, png(W, H, salt)).expect("write image");
            p
        })
        .collect();
    let config = serde_json::json!({
        "chromium": tools.chromium,
        "playwright": tools.playwright,
        "server": dev.server,
        "proxy": format!("http://{}", proxy.addr),
        "allowed": allowed_origin,
        "refused": refused_origin,
        "images": images,
        "out": out,
    });
    let done = drive(&tools, &config.to_string(), &proxy);

    // What the browser did, seen through the API.
    let invert = done["invert"].as_str().expect("invert id");
    let cancelled = done["cancelled"].as_str().expect("cancelled id");
    let cloud = done["cloud"].as_str().expect("RunComfy job id");
    let job = helpers::run(dev.cli().args(["get", cloud, "--json"]));
    assert!(job.stdout.contains("\"succeeded\"") || job.stdout.contains("SUCCEEDED"), "{job:?}");
    let machines = helpers::run(dev.cli().args(["machines", "--json"]));
    // Drained from the console, then undrained for the job that waited for it.
    let emulator = machines.stdout.lines().find(|l| l.contains("\"emulator\"")).unwrap_or_default();
    assert!(emulator.contains("\"ready\"") || emulator.contains("READY"), "{machines:?}");
    let waiting = done["waiting"].as_str().expect("waiting id");
    let job = helpers::run(dev.cli().args(["get", waiting, "--json"]));
    assert!(job.stdout.contains("\"succeeded\"") || job.stdout.contains("SUCCEEDED"), "{job:?}");
    let job = helpers::run(dev.cli().args(["get", invert, "--json"]));
    assert!(job.stdout.contains("\"succeeded\"") || job.stdout.contains("SUCCEEDED"), "{job:?}");
    let job = helpers::run(dev.cli().args(["get", cancelled, "--json"]));
    assert!(job.stdout.contains("\"cancelled\"") || job.stdout.contains("CANCELLED"), "{job:?}");
    assert!(
        proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the stream came back on a new connection"
    );
    assert_inverted(&out.join("output.png"), &png(W, H, 1));
    for shot in ["job.png", "machines.png", "jobs.png"] {
        let len = std::fs::metadata(out.join(shot)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "{shot} written ({len} bytes)");
    }
}

#[test]
fn listed_origins_get_cors_for_grpc_web_others_none_and_the_console_is_served_under_its_policy() {
    let allowed_origin = "http://127.0.0.1:9";
    let refused_origin = "http://localhost:9";
    let origins = format!(r#"["{allowed_origin}"]"#);
    let dev = Dev::start_with(&["--comfy-port", "0"], &[("COMFYRELAY_GRPC__CORS_ORIGINS", origins.as_str())]);
    // CORS on the wire: the allowed origin gets what gRPC-Web needs, any other origin nothing at all.
    let (status, headers) = preflight(dev.addr, allowed_origin);
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(header(&headers, "access-control-allow-origin"), Some(allowed_origin));
    let allowed_headers = header(&headers, "access-control-allow-headers").unwrap_or_default();
    for h in ["content-type", "x-grpc-web", "x-user-agent", "grpc-timeout", "authorization"] {
        assert!(allowed_headers.contains(h), "{h} allowed: {allowed_headers}");
    }
    assert_eq!(header(&headers, "access-control-allow-credentials"), None, "no credentials");
    let (_, headers) = preflight(dev.addr, refused_origin);
    let cors: Vec<_> = headers.iter().filter(|(k, _)| k.starts_with("access-control-")).collect();
    assert!(cors.is_empty(), "a refused origin gets no CORS header: {cors:?}");
    let (_, headers, _) = http(
        dev.addr,
        &format!(
            "POST /comfyrelay.v1.WorkflowService/ListWorkflows HTTP/1.1\r\nHost: {}\r\nOrigin: {allowed_origin}\r\n\
             Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0",
            dev.addr
        ),
    );
    let exposed = header(&headers, "access-control-expose-headers").unwrap_or_default();
    for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(h), "{h} exposed: {exposed}");
    }

    let assets = console_assets(dev.addr);
    assert!(assets.iter().any(|(p, ty, _)| p == "/console/console.js" && ty.starts_with("text/javascript")));
    let (status, headers, _) =
        http(dev.addr, &format!("GET /console HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", dev.addr));
    assert!(status.contains(" 308 "), "{status}");
    assert_eq!(header(&headers, "location"), Some("/console/"));
}

/// The console's files as comfyrelay serves them, checked for their policy: (path, content type, bytes).
fn console_assets(server: SocketAddr) -> Vec<(String, String, Vec<u8>)> {
    let mut assets = Vec::new();
    for path in ["/console/", "/console/console.js", "/console/console.css"] {
        let (status, headers, body) =
            http(server, &format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", server));
        assert!(status.contains(" 200 "), "{path}: {status}");
        let csp = header(&headers, "content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{path}: {csp}");
        let ty = header(&headers, "content-type").unwrap_or_default().to_string();
        assets.push((path.to_string(), ty, body));
    }
    assets
}

/// Runs drive.mjs with `config`, cutting the proxy when it asks; returns its `done` object.
fn drive(tools: &Tools, config: &str, proxy: &Proxy) -> serde_json::Value {
    let script = repo().join("tests/console/drive.mjs");
    let mut child = Command::new(&tools.node)
        .arg(&script)
        .env("CONSOLE_TEST", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + DRIVE_DEADLINE;
    let mut done = None;
    let mut cuts = 0;
    while done.is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = rx.recv_timeout(left) else { break };
        let msg: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if msg["cut"] == true {
            proxy.cut();
            cuts += 1;
            writeln!(stdin, "cut").expect("answer the driver");
        } else if !msg["done"].is_null() {
            done = Some(msg["done"].clone());
        }
    }
    if done.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    let log = err.join().unwrap_or_default();
    eprintln!("{log}");
    let done = done.unwrap_or_else(|| panic!("the browser session did not finish ({status}):\n{log}"));
    assert!(status.success(), "{status}:\n{log}");
    assert_eq!(cuts, 1, "the connection was cut once");
    done
}

fn assert_inverted(output: &Path, input: &[u8]) {
    let got = image::open(output).unwrap_or_else(|e| panic!("{}: {e}", output.display())).to_rgb8();
    let want = image::load_from_memory(input).expect("input").to_rgb8();
    assert_eq!(got.dimensions(), want.dimensions());
    // ComfyUI's arithmetic (as in tests/clients/dev.rs): x/255, 1 - x in float32, 255 * y truncated.
    let invert = |x: u8| (255.0f32 * (1.0f32 - f32::from(x) / 255.0f32)).clamp(0.0, 255.0) as u8;
    for (g, w) in got.pixels().zip(want.pixels()) {
        assert_eq!(g.0, w.0.map(invert), "every pixel inverted");
    }
}
