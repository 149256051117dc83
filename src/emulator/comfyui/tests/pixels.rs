//! Nodes run on real pixels.

use super::harness::*;
use serde_json::json;

#[tokio::test]
async fn image_invert_inverts_uploaded_pixels() {
    let emu = start().await;
    let png = test_png(8, 8);
    let up = upload(&emu, "px.png", png.clone()).await;
    assert_eq!(up["name"], "px.png");
    let mut ws = Ws::connect(&emu, Some("p")).await;
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "px.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}
    });
    let (status, body) = post_prompt(&emu, &json!({"prompt": prompt, "client_id": "p"})).await;
    assert_eq!(status, 200);
    let pid = body["prompt_id"].as_str().expect("id").to_string();
    let frames = ws.until_done(&pid).await;
    let executed = frames.iter().find(|f| f.kind() == "executed").expect("executed");
    let name = executed.data()["output"]["images"][0]["filename"].as_str().expect("filename").to_string();
    let resp = http()
        .get(format!("{}/view?filename={name}&subfolder=&type=output", emu.url()))
        .send()
        .await
        .expect("view");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let bytes = resp.bytes().await.expect("bytes");
    // Like ComfyUI, the saved PNG carries the prompt as a tEXt chunk.
    let reader = png::Decoder::new(std::io::Cursor::new(bytes.to_vec())).read_info().expect("png");
    let text = &reader.info().uncompressed_latin1_text;
    assert_eq!(text[0].keyword, "prompt");
    assert!(text[0].text.starts_with(r#"{"1": {"class_type": "LoadImage""#));
    let out = image::load_from_memory(&bytes).expect("png").to_rgb8();
    let input = image::load_from_memory(&png).expect("png").to_rgb8();
    for (a, b) in input.pixels().zip(out.pixels()) {
        for c in 0..3 {
            // ComfyUI's float32 pipeline: load /255, invert 1 - x, save clip(255 x) truncated.
            let expected = (255.0f32 * (1.0f32 - a.0[c] as f32 / 255.0f32)).clamp(0.0, 255.0) as u8;
            assert_eq!(b.0[c], expected);
            assert!((255 - a.0[c]).abs_diff(b.0[c]) <= 1);
        }
    }
}
