//! `comfyrelay dev` from an empty directory with ComfyUI's port taken, then the README's quick start.

use crate::helpers::{Dev, run};

/// The README's quick start runs exactly this, in a second terminal.
const QUICK_START: &str = "comfyrelay run invert photo.png --out out/";

#[test]
fn dev_starts_anywhere_with_8188_taken_and_run_saves_the_inverted_image() {
    // Another listener on 8188 (a real ComfyUI, say). If something already holds it, that is the same case.
    let held = std::net::TcpListener::bind("127.0.0.1:8188");
    assert!(
        held.is_ok() || std::net::TcpListener::bind("127.0.0.1:8188").is_err(),
        "8188 must be taken, by this test or by someone else"
    );
    let dev = Dev::start(&[]);
    let comfy_port: u16 = dev.comfy_url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    assert_ne!(comfy_port, 8188, "{}", dev.printed());
    assert!(
        dev.printed()
            .contains(&format!("port 8188 is in use, so the emulated ComfyUI took port {comfy_port}")),
        "dev must say which port it took: {}",
        dev.printed()
    );
    let readme = std::fs::read_to_string(crate::helpers::repo().join("README.md")).expect("README");
    assert!(readme.contains(QUICK_START), "the README's quick start must run `{QUICK_START}`");
    let input = dev.image("photo.png", 0);
    let args: Vec<&str> = QUICK_START.split_whitespace().skip(1).collect();
    let out = run(dev.cli().args(&args));
    assert_eq!(out.code, Some(0), "{out:?}");

    let saved: Vec<_> = std::fs::read_dir(dev.dir.path().join("out"))
        .expect("out/")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(out.stdout.contains("saved out/"), "{out:?}");
    let original = image::open(&input).expect("decode input").to_rgb8();
    let inverted = image::open(&saved[0]).expect("decode output").to_rgb8();
    assert_eq!(inverted.dimensions(), original.dimensions());
    // ComfyUI's arithmetic: load x/255 and invert 1 - x in float32, save 255 * y truncated.
    let invert = |x: u8| (255.0f32 * (1.0f32 - f32::from(x) / 255.0f32)).clamp(0.0, 255.0) as u8;
    for (a, b) in original.pixels().zip(inverted.pixels()) {
        for c in 0..3 {
            assert_eq!(b[c], invert(a[c]), "pixel {a:?} inverted is {b:?}");
            assert!(b[c].abs_diff(255 - a[c]) <= 1, "pixel {a:?} inverted is {b:?}");
        }
    }
    // The bundled workflows come from the binary: only the data and what this test made appear here.
    let mut entries: Vec<String> = std::fs::read_dir(dev.dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["data", "out", "photo.png"]);
    drop(held);
}

#[test]
fn a_taken_grpc_port_is_an_error_naming_the_address_and_the_setting() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(crate::helpers::comfyrelay()
        .args(["dev", "--comfy-port", "0"])
        .current_dir(dir.path())
        .env("COMFYRELAY_GRPC__LISTEN", addr.to_string()));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&addr.to_string()) && out.stderr.contains("COMFYRELAY_GRPC__LISTEN"),
        "{out:?}"
    );
    // An explicit emulator port is bound exactly or refused, naming its flag.
    let out = run(crate::helpers::comfyrelay()
        .args(["dev", "--comfy-port", &addr.port().to_string()])
        .current_dir(dir.path())
        .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0"));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&addr.to_string()) && out.stderr.contains("--comfy-port"), "{out:?}");
}
