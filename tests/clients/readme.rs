//! The README's CLI examples, run as written: the shell block after the marker
//! `<!-- tests/clients/readme.rs runs this block -->` is executed by bash (`set -euo pipefail`) with
//! `comfyrelay` on the PATH, against `comfyrelay dev`, in a directory holding `photo.png`.

use crate::helpers::{Dev, repo, run};

const MARKER: &str = "<!-- tests/clients/readme.rs runs this block -->";

/// The fenced block after `marker` in `text`.
pub(crate) fn block_after<'a>(text: &'a str, marker: &str) -> &'a str {
    let rest = &text[text.find(marker).unwrap_or_else(|| panic!("README has no {marker}")) + marker.len()..];
    let open = rest.find("```").expect("a fenced block after the marker");
    let body = &rest[open..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    &body[..body.find("```").expect("closing fence")]
}

#[test]
fn the_readme_cli_examples_run() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let script = block_after(&readme, MARKER);
    assert!(script.contains("comfyrelay run") && script.contains("comfyrelay watch"), "{script}");
    let dev = Dev::start(&["--comfy-port", "0"]);
    dev.image("photo.png", 9);
    let bin_dir = std::path::Path::new(crate::helpers::BIN).parent().expect("bin dir");
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = run(std::process::Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .env_clear()
        .env("PATH", path)
        .env("COMFYRELAY_SERVER", &dev.server)
        .current_dir(dev.dir.path()));
    assert_eq!(out.code, Some(0), "the README's CLI block failed:\n{script}\n{out:?}");
    assert!(dev.dir.path().join("out").read_dir().expect("out/").count() >= 2, "{out:?}");
}
