//! Artifacts in an object store (`storage.artifacts_url`), here object_store's local filesystem backend
//! (`file://`): inputs and outputs go there, not to `<data_dir>/artifacts`, and DownloadOutput streams them
//! back. `s3://` is tested against moto's S3 server with replicas (`replicas.rs`).

use std::path::{Path, PathBuf};

use comfyrelay::proto::pb;
use sha2::Digest as _;

use crate::helpers::{collect_events, png, spawn_app_with, submit_request, terminal};

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[tokio::test]
async fn an_invert_job_keeps_its_artifacts_in_the_object_store() {
    let objects = tempfile::tempdir().unwrap();
    let url = format!("file://{}", objects.path().join("artifacts").display());
    let mut app = spawn_app_with(|c| {
        c.storage.artifacts_url = Some(url.clone());
        // Not inline: the output comes back through the object store's stream.
        c.jobs.inline_output_max_bytes = 0;
    })
    .await;
    let input = png(32, 16);
    let job = app.jobs.submit_job(submit_request("invert", input.clone())).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");

    let got = app.jobs.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.outputs.len(), 1, "{got:?}");
    let out = &got.outputs[0];
    assert!(out.inline_data.is_empty());
    let mut stream = app
        .jobs
        .download_output(pb::DownloadOutputRequest {
            job_id: job.id.clone(),
            filename: out.filename.clone(),
            chunk_size: 1024,
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.offset as usize, bytes.len());
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(bytes.len() as u64, out.size_bytes);
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), out.sha256);
    let image = image::load_from_memory(&bytes).unwrap();
    assert_eq!((image.width(), image.height()), (32, 16));

    // The output and the input image are objects under <sha[..2]>/<sha>; the directory holds none.
    let root = objects.path().join("artifacts");
    let output = root.join(&out.sha256[..2]).join(&out.sha256);
    assert_eq!(std::fs::metadata(&output).unwrap().len(), out.size_bytes);
    let input_sha = hex::encode(sha2::Sha256::digest(&input));
    assert!(root.join(&input_sha[..2]).join(&input_sha).is_file());
    let dir = app.data_dir.path().join("artifacts");
    let stray: Vec<_> = files_under(&dir).into_iter().filter(|p| !p.starts_with(dir.join("tmp"))).collect();
    assert!(stray.is_empty(), "{stray:?}");
}
