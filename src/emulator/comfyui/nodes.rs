//! The emulated node classes: their `/object_info` specs (verbatim from the real server) and their
//! model-free implementations on real pixels, reproducing ComfyUI's float32 arithmetic where it matters
//! (load `/255`, invert `1 - x`, save `clip(255 x)` truncated). Knows nothing about queues or sockets:
//! side channels (progress, text frames, interrupts) go through [`NodeContext`].

use super::pyjson;
use image::{ImageBuffer, Rgb};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

/// `/object_info` entries of every emulated class, captured from ComfyUI 0.3.64.
static OBJECT_INFO: LazyLock<Map<String, Value>> = LazyLock::new(|| {
    serde_json::from_str::<Map<String, Value>>(include_str!("object_info.json")).unwrap_or_default()
});

/// Extensions ComfyUI's LoadImage lists (files whose guessed mimetype is `image/*`).
const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "ico", "svg", "avif", "heic", "heif", "jfif",
];

/// A batch of RGB float images, `[B, H, W, 3]` like ComfyUI's IMAGE tensors.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ImageBatch {
    pub(crate) width: usize,
    pub(crate) height: usize,
    /// One interleaved RGB `f32` buffer per image, values nominally in `0..=1` (shared when equal, so a
    /// large EmptyImage batch costs one frame of memory).
    pub(crate) frames: Vec<Arc<Vec<f32>>>,
}

impl ImageBatch {
    /// Encodes frame `i` as 8-bit RGB, with numpy's `clip(255. * x, 0, 255).astype(uint8)` truncation.
    pub(crate) fn to_rgb8(&self, i: usize) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
        let data: Vec<u8> = self.frames[i].iter().map(|&x| (255.0f32 * x).clamp(0.0, 255.0) as u8).collect();
        ImageBuffer::from_raw(self.width as u32, self.height as u32, data).unwrap_or_default()
    }

    /// Encodes frame `i` as a PNG (fast compression, like `compress_level=1`).
    pub(crate) fn png(&self, i: usize) -> Result<Vec<u8>, NodeFailure> {
        encode_png(&self.to_rgb8(i), &[])
    }
}

/// What flows along links.
#[derive(Debug, Clone)]
pub(crate) enum NodeValue {
    Image(Arc<ImageBatch>),
    Mask {
        width: usize,
        height: usize,
        batch: usize,
    },
    Int(i64),
    /// `ExecutionBlocker(message)`: the node that receives one with a message reports it; nodes further
    /// down get `ExecutionBlocker(None)` and stay silent.
    Blocked(Option<String>),
}

impl NodeValue {
    /// `current_inputs` formatting (`format_value` in execution.py: `str()` of anything exotic).
    pub(crate) fn formatted(&self) -> Value {
        match self {
            NodeValue::Int(i) => json!(i),
            NodeValue::Image(img) => Value::String(format!(
                "tensor(<{}x{}x{}x3 float32>)",
                img.frames.len(),
                img.height,
                img.width
            )),
            NodeValue::Mask { width, height, batch } => {
                Value::String(format!("tensor(<{batch}x{height}x{width} float32>)"))
            }
            NodeValue::Blocked(_) => Value::String("<comfy_execution.graph.ExecutionBlocker object>".into()),
        }
    }
}

/// A node's result: its outputs (by slot) and its UI output, if any.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeOutput {
    pub(crate) outputs: Vec<NodeValue>,
    pub(crate) ui: Option<Value>,
}

/// Why a node failed; the executor turns it into `execution_error` or `execution_interrupted`.
#[derive(Debug, Clone)]
pub(crate) enum NodeFailure {
    Interrupted,
    /// The emulator was restarted: stop silently.
    Abandoned,
    Error {
        exception_type: String,
        message: String,
        traceback: Vec<String>,
    },
}

impl NodeFailure {
    pub(crate) fn error(exception_type: &str, message: impl Into<String>) -> Self {
        NodeFailure::Error {
            exception_type: exception_type.into(),
            message: message.into(),
            traceback: Vec::new(),
        }
    }
}

/// Side channels a running node may use; implemented by the executor.
pub(crate) trait NodeContext {
    /// `ProgressBar.update_absolute(value, max, preview)`; checks the interrupt flag first.
    fn progress(&mut self, value: u64, max: u64, preview_png: Option<Vec<u8>>) -> Result<(), NodeFailure>;
    /// `throw_exception_if_processing_interrupted()` (clears the flag when it fires).
    fn check_interrupt(&mut self) -> Result<(), NodeFailure>;
    /// `PromptServer.send_progress_text` (always broadcast).
    fn progress_text(&mut self, text: &str) -> Result<(), NodeFailure>;
    /// The per-node random part of PreviewImage's prefix (`_temp_xxxxx`).
    fn temp_suffix(&mut self) -> String;
    /// PNG `tEXt` metadata for saved images: `prompt`, then each `extra_pnginfo` entry (JSON text).
    fn png_text(&self) -> Vec<(String, String)>;
    fn dirs(&self) -> &Dirs;
}

/// The server's input/output/temp folders.
#[derive(Debug, Clone)]
pub(crate) struct Dirs {
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    pub(crate) temp: PathBuf,
}

impl Dirs {
    /// `folder_paths.get_directory_by_type`.
    pub(crate) fn by_type(&self, kind: &str) -> Option<&Path> {
        match kind {
            "input" => Some(&self.input),
            "output" => Some(&self.output),
            "temp" => Some(&self.temp),
            _ => None,
        }
    }

    /// `folder_paths.annotated_filepath` + `get_annotated_filepath(name, default=input)`.
    pub(crate) fn annotated_input_path(&self, name: &str) -> PathBuf {
        let (name, dir) = split_annotation(name);
        let dir = dir.and_then(|d| self.by_type(d)).unwrap_or(&self.input);
        dir.join(name)
    }
}

/// Splits `"x.png [output]"` into `("x.png", Some("output"))`.
pub(crate) fn split_annotation(name: &str) -> (&str, Option<&'static str>) {
    for (suffix, kind) in [(" [output]", "output"), (" [input]", "input"), (" [temp]", "temp")] {
        if let Some(stripped) = name.strip_suffix(suffix) {
            return (stripped, Some(kind));
        }
    }
    (name, None)
}

/// Returns the `/object_info` entry of `class`, with LoadImage's option list read from `input_dir`.
pub(crate) fn object_info(class: &str, input_dir: &Path) -> Option<Value> {
    let mut info = OBJECT_INFO.get(class)?.clone();
    if class == "LoadImage" {
        let files = list_input_images(input_dir);
        if let Some(slot) = info.pointer_mut("/input/required/image/0") {
            *slot = json!(files);
        }
    }
    Some(info)
}

/// Every emulated class name, in `/object_info` order.
pub(crate) fn class_names() -> impl Iterator<Item = &'static String> {
    OBJECT_INFO.keys()
}

/// Sorted top-level image files of the input folder.
pub(crate) fn list_input_images(input_dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(input_dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    Path::new(n)
                        .extension()
                        .and_then(|e| e.to_str())
                        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Static facts about a class the executor and validator need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassTraits {
    pub(crate) output_node: bool,
    /// `IS_CHANGED` returns `time.time()`: never cached.
    pub(crate) never_cached: bool,
    /// Has a hidden `UNIQUE_ID` input, so the cache key includes the node id.
    pub(crate) unique_id_in_key: bool,
    /// Has `VALIDATE_INPUTS(image)` (LoadImage): the combo check is skipped, the file checked instead.
    pub(crate) validates_image: bool,
}

/// Traits of `class`, `None` for an unknown class.
pub(crate) fn traits(class: &str) -> Option<ClassTraits> {
    let info = OBJECT_INFO.get(class)?;
    Some(ClassTraits {
        output_node: info.get("output_node").and_then(Value::as_bool).unwrap_or(false),
        never_cached: class == "SaveImageWebsocket",
        unique_id_in_key: class == "GetImageSize",
        validates_image: class == "LoadImage",
    })
}

/// `RETURN_TYPES` of `class`.
pub(crate) fn return_types(class: &str) -> Vec<String> {
    OBJECT_INFO
        .get(class)
        .and_then(|i| i.get("output"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Runs `class` on resolved `inputs` (links replaced by upstream values, widgets as JSON).
pub(crate) fn run(
    class: &str,
    inputs: &Map<String, Value>,
    links: &std::collections::HashMap<String, NodeValue>,
    ctx: &mut dyn NodeContext,
) -> Result<NodeOutput, NodeFailure> {
    let image = |name: &str| -> Result<Arc<ImageBatch>, NodeFailure> {
        match links.get(name) {
            Some(NodeValue::Image(img)) => Ok(img.clone()),
            _ => Err(NodeFailure::error(
                "AttributeError",
                format!("'NoneType' object has no attribute 'shape' ({name})"),
            )),
        }
    };
    let int = |name: &str, default: i64| inputs.get(name).and_then(Value::as_i64).unwrap_or(default);
    let float = |name: &str, default: f64| inputs.get(name).and_then(Value::as_f64).unwrap_or(default);
    let string = |name: &str, default: &str| {
        inputs.get(name).map(pyjson::py_str).unwrap_or_else(|| default.to_string())
    };
    match class {
        "LoadImage" => load_image(&string("image", ""), ctx.dirs()),
        "ImageInvert" => {
            let img = image("image")?;
            let frames = map_frames(&img, |f| Arc::new(f.iter().map(|&x| 1.0f32 - x).collect()));
            Ok(single(ImageBatch { width: img.width, height: img.height, frames }))
        }
        "EmptyImage" => {
            let (w, h, b, color) =
                (int("width", 512), int("height", 512), int("batch_size", 1), int("color", 0));
            empty_image(w, h, b, color)
        }
        "ImageBlur" => {
            let img = image("image")?;
            blur(&img, int("blur_radius", 1), float("sigma", 1.0))
        }
        "ImageScale" => {
            let img = image("image")?;
            scale(
                &img,
                &string("upscale_method", "nearest-exact"),
                int("width", 512),
                int("height", 512),
                &string("crop", "disabled"),
            )
        }
        "SaveImage" => {
            let img = image("images")?;
            let prefix = string("filename_prefix", "ComfyUI");
            let dir = ctx.dirs().output.clone();
            save_images(&img, &prefix, &dir, "output", &ctx.png_text())
        }
        "PreviewImage" => {
            let img = image("images")?;
            let prefix = format!("ComfyUI_temp_{}", ctx.temp_suffix());
            let dir = ctx.dirs().temp.clone();
            save_images(&img, &prefix, &dir, "temp", &ctx.png_text())
        }
        "SaveImageWebsocket" => {
            let img = image("images")?;
            let n = img.frames.len() as u64;
            for i in 0..img.frames.len() {
                // The hook checks the interrupt before the preview is encoded and sent.
                ctx.check_interrupt()?;
                let png = img.png(i)?;
                ctx.progress(i as u64, n, Some(png))?;
            }
            Ok(NodeOutput { outputs: Vec::new(), ui: None })
        }
        "GetImageSize" => {
            let img = image("image")?;
            let (w, h, b) = (img.width as i64, img.height as i64, img.frames.len() as i64);
            ctx.progress_text(&format!("width: {w}, height: {h}\n batch size: {b}"))?;
            Ok(NodeOutput {
                outputs: vec![NodeValue::Int(w), NodeValue::Int(h), NodeValue::Int(b)],
                ui: None,
            })
        }
        "PreviewAny" => {
            let text = match links.get("source") {
                Some(NodeValue::Int(i)) => i.to_string(),
                Some(other) => pyjson::py_str(&other.formatted()),
                None => match inputs.get("source") {
                    None | Some(Value::Null) => "None".to_string(),
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => pyjson::py_str(v),
                    Some(v) => pyjson::dumps(v),
                },
            };
            Ok(NodeOutput { outputs: Vec::new(), ui: Some(json!({"text": [text]})) })
        }
        other => Err(NodeFailure::error("KeyError", format!("'{other}'"))),
    }
}

/// Applies `op` to each frame, once per distinct (shared) frame buffer.
fn map_frames(img: &ImageBatch, mut op: impl FnMut(&Arc<Vec<f32>>) -> Arc<Vec<f32>>) -> Vec<Arc<Vec<f32>>> {
    let mut done: Vec<(*const Vec<f32>, Arc<Vec<f32>>)> = Vec::new();
    img.frames
        .iter()
        .map(|f| {
            if let Some((_, out)) = done.iter().find(|(p, _)| std::ptr::eq(*p, Arc::as_ptr(f))) {
                return out.clone();
            }
            let out = op(f);
            done.push((Arc::as_ptr(f), out.clone()));
            out
        })
        .collect()
}

fn single(img: ImageBatch) -> NodeOutput {
    NodeOutput { outputs: vec![NodeValue::Image(Arc::new(img))], ui: None }
}

/// Encodes an RGB PNG with `tEXt` chunks (SaveImage's `prompt` / `extra_pnginfo` metadata).
fn encode_png(
    img: &ImageBuffer<Rgb<u8>, Vec<u8>>,
    texts: &[(String, String)],
) -> Result<Vec<u8>, NodeFailure> {
    let err = |e: png::EncodingError| NodeFailure::error("OSError", e.to_string());
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    for (k, v) in texts {
        enc.add_text_chunk(k.clone(), v.clone()).map_err(err)?;
    }
    let mut writer = enc.write_header().map_err(err)?;
    writer.write_image_data(img.as_raw()).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(out)
}

/// The first frames of a traceback through `node_helpers.pillow(Image.open, ...)` in LoadImage.
const PILLOW_OPEN_FRAMES: [&str; 2] = [
    "  File \"/opt/ComfyUI/nodes.py\", line 1647, in load_image\n    img = node_helpers.pillow(Image.open, image_path)\n          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
    "  File \"/opt/ComfyUI/node_helpers.py\", line 31, in pillow\n    x = fn(arg)\n        ^^^^^^^\n",
];

/// Pillow's `Image.open` refuses images above twice `Image.MAX_IMAGE_PIXELS` (89 478 485) with a
/// `DecompressionBombError`, before decoding.
pub(crate) const PIL_BOMB_PIXELS: u64 = 2 * 89_478_485;

/// Why [`decode_bounded`] refused to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeRefusal {
    /// Not an image the emulator reads, or a corrupt one.
    Unreadable,
    /// Declares more pixels than Pillow opens.
    Bomb { pixels: u64 },
    /// Declares more than the emulator's frame bound ([`MAX_FRAME_PIXELS`]).
    TooLarge { width: usize, height: usize },
}

/// Decodes an image whose header declares at most [`MAX_FRAME_PIXELS`], with the `image` crate's
/// allocation limit set to match, so a small file declaring a huge image (a decompression bomb) fails
/// instead of exhausting the host: the size is read from the header before a pixel is decoded.
pub(crate) fn decode_bounded(bytes: &[u8]) -> Result<image::DynamicImage, DecodeRefusal> {
    let reader = || {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|_| DecodeRefusal::Unreadable)?;
        let mut limits = image::Limits::default();
        // RGBA with 16 bits per channel is the largest buffer a decoder allocates per pixel.
        limits.max_alloc = Some(MAX_FRAME_PIXELS as u64 * 8);
        reader.limits(limits);
        Ok(reader)
    };
    let (w, h) = reader()?.into_dimensions().map_err(|_| DecodeRefusal::Unreadable)?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > PIL_BOMB_PIXELS {
        return Err(DecodeRefusal::Bomb { pixels });
    }
    if pixels > MAX_FRAME_PIXELS as u64 {
        return Err(DecodeRefusal::TooLarge { width: w as usize, height: h as usize });
    }
    reader()?.decode().map_err(|_| DecodeRefusal::Unreadable)
}

/// LoadImage: PIL open, RGB convert, `/255` in float32; the MASK is `1 - alpha` (or 64x64 zeros).
fn load_image(name: &str, dirs: &Dirs) -> Result<NodeOutput, NodeFailure> {
    let path = dirs.annotated_input_path(name);
    let bytes = std::fs::read(&path).map_err(|e| {
        NodeFailure::error(
            "FileNotFoundError",
            format!("[Errno 2] No such file or directory: '{}' ({e})", path.display()),
        )
    })?;
    let unidentified = || {
        NodeFailure::Error {
        exception_type: "PIL.UnidentifiedImageError".into(),
        message: format!("cannot identify image file '{}'", path.display()),
        traceback: vec![
            PILLOW_OPEN_FRAMES[0].into(),
            PILLOW_OPEN_FRAMES[1].into(),
            "  File \"/opt/venv/lib/python3.11/site-packages/PIL/Image.py\", line 3730, in open\n    raise UnidentifiedImageError(msg)\n".into(),
        ],
    }
    };
    let decoded = decode_bounded(&bytes).map_err(|refusal| match refusal {
        DecodeRefusal::Unreadable => unidentified(),
        DecodeRefusal::Bomb { pixels } => NodeFailure::Error {
            exception_type: "PIL.Image.DecompressionBombError".into(),
            message: format!(
                "Image size ({pixels} pixels) exceeds limit of {PIL_BOMB_PIXELS} pixels, could be decompression bomb DOS attack."
            ),
            traceback: vec![
                PILLOW_OPEN_FRAMES[0].into(),
                PILLOW_OPEN_FRAMES[1].into(),
                "  File \"/opt/venv/lib/python3.11/site-packages/PIL/Image.py\", line 3724, in open\n    _decompression_bomb_check(im.size)\n".into(),
                "  File \"/opt/venv/lib/python3.11/site-packages/PIL/Image.py\", line 3628, in _decompression_bomb_check\n    raise DecompressionBombError(msg)\n".into(),
            ],
        },
        DecodeRefusal::TooLarge { width, height } => match check_frame_size(width, height, 1) {
            Err(failure) => failure,
            Ok(()) => unidentified(),
        },
    })?;
    let has_alpha = decoded.color().has_alpha();
    let rgb = decoded.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let frame: Vec<f32> = rgb.as_raw().iter().map(|&v| v as f32 / 255.0f32).collect();
    let mask = if has_alpha {
        NodeValue::Mask { width: w, height: h, batch: 1 }
    } else {
        NodeValue::Mask { width: 64, height: 64, batch: 1 }
    };
    Ok(NodeOutput {
        outputs: vec![
            NodeValue::Image(Arc::new(ImageBatch { width: w, height: h, frames: vec![Arc::new(frame)] })),
            mask,
        ],
        ui: None,
    })
}

/// Frames above this many pixels fail like torch's allocator would on a small machine, instead of
/// exhausting the test host (the real server happily allocates 16384x16384).
const MAX_FRAME_PIXELS: usize = 4096 * 4096;

fn check_frame_size(w: usize, h: usize, b: usize) -> Result<(), NodeFailure> {
    if w.saturating_mul(h) > MAX_FRAME_PIXELS {
        let bytes = w.saturating_mul(h).saturating_mul(3).saturating_mul(4).saturating_mul(b.max(1));
        return Err(NodeFailure::error(
            "RuntimeError",
            format!(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate {bytes} bytes."
            ),
        ));
    }
    Ok(())
}

fn empty_image(w: i64, h: i64, b: i64, color: i64) -> Result<NodeOutput, NodeFailure> {
    let (w, h, b) = (w.max(0) as usize, h.max(0) as usize, b.max(0) as usize);
    check_frame_size(w, h, b)?;
    let channel = |shift: i64| (((color >> shift) & 0xFF) as f64 / 255.0) as f32;
    let px = [channel(16), channel(8), channel(0)];
    let mut frame = Vec::with_capacity(w * h * 3);
    for _ in 0..w * h {
        frame.extend_from_slice(&px);
    }
    let frame = Arc::new(frame);
    Ok(single(ImageBatch { width: w, height: h, frames: vec![frame; b] }))
}

/// ImageBlur (comfy_extras.nodes_post_processing.Blur): a gaussian over `linspace(-1, 1, 2r+1)` with
/// reflect padding; applied separably.
fn blur(img: &ImageBatch, radius: i64, sigma: f64) -> Result<NodeOutput, NodeFailure> {
    if radius <= 0 {
        return Ok(single(img.clone()));
    }
    let r = radius as usize;
    if r >= img.width || r >= img.height {
        return Err(NodeFailure::error(
            "RuntimeError",
            format!(
                "Argument #4: Padding size should be less than the corresponding input dimension, but got: padding ({r}, {r}) at dimension 3 of input [{}, 3, {}, {}]",
                img.frames.len(),
                img.height,
                img.width
            ),
        ));
    }
    let k = 2 * r + 1;
    let sigma = sigma as f32;
    let weights: Vec<f32> = (0..k)
        .map(|i| {
            let x = -1.0f32 + 2.0f32 * i as f32 / (k as f32 - 1.0);
            (-(x * x) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / sum).collect();
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let mut i = i;
        if i < 0 {
            i = -i;
        }
        if i >= n {
            i = 2 * (n - 1) - i;
        }
        i.clamp(0, n - 1) as usize
    };
    let (w, h) = (img.width, img.height);
    let frames = map_frames(img, |f| {
        // A uniform frame (EmptyImage) blurs to itself; skipping the convolution keeps the captured
        // "slow" 512x512 chains cheap in debug builds.
        if f.chunks_exact(3).all(|px| px == &f[..3]) {
            return f.clone();
        }
        Arc::new(blur_frame(f, w, h, r, &weights, reflect))
    });
    Ok(single(ImageBatch { width: w, height: h, frames }))
}

/// Separable convolution over reflect-padded rows, then a row-wise vertical pass.
fn blur_frame(
    f: &[f32],
    w: usize,
    h: usize,
    r: usize,
    weights: &[f32],
    reflect: impl Fn(isize, usize) -> usize,
) -> Vec<f32> {
    let k = weights.len();
    let stride = w * 3;
    let mut tmp = vec![0f32; f.len()];
    let mut padded = vec![0f32; (w + 2 * r) * 3];
    for y in 0..h {
        let row = &f[y * stride..(y + 1) * stride];
        for i in 0..w + 2 * r {
            let sx = reflect(i as isize - r as isize, w);
            padded[i * 3..i * 3 + 3].copy_from_slice(&row[sx * 3..sx * 3 + 3]);
        }
        let out_row = &mut tmp[y * stride..(y + 1) * stride];
        for x in 0..w {
            let mut acc = [0f32; 3];
            for (wt, px) in weights.iter().zip(padded[x * 3..(x + k) * 3].chunks_exact(3)) {
                acc[0] += wt * px[0];
                acc[1] += wt * px[1];
                acc[2] += wt * px[2];
            }
            out_row[x * 3..x * 3 + 3].copy_from_slice(&acc);
        }
    }
    let mut out = vec![0f32; f.len()];
    for y in 0..h {
        let o = &mut out[y * stride..(y + 1) * stride];
        for (j, wt) in weights.iter().enumerate() {
            let sy = reflect(y as isize + j as isize - r as isize, h);
            for (a, b) in o.iter_mut().zip(&tmp[sy * stride..(sy + 1) * stride]) {
                *a += wt * b;
            }
        }
    }
    out
}

/// ImageScale via `comfy.utils.common_upscale` (torch `interpolate`, align_corners=False).
fn scale(
    img: &ImageBatch,
    method: &str,
    width: i64,
    height: i64,
    crop: &str,
) -> Result<NodeOutput, NodeFailure> {
    if width == 0 && height == 0 {
        return Ok(single(img.clone()));
    }
    let (ow, oh) = (img.width as f64, img.height as f64);
    let (mut width, mut height) = (width, height);
    if width == 0 {
        width = ((ow * height as f64 / oh).round_ties_even() as i64).max(1);
    } else if height == 0 {
        height = ((oh * width as f64 / ow).round_ties_even() as i64).max(1);
    }
    let (tw, th) = (width.max(1) as usize, height.max(1) as usize);
    check_frame_size(tw, th, img.frames.len())?;
    // Center crop to the target aspect first.
    let (mut x0, mut y0, mut cw, mut ch) = (0usize, 0usize, img.width, img.height);
    if crop == "center" {
        let old_aspect = ow / oh;
        let new_aspect = tw as f64 / th as f64;
        if old_aspect > new_aspect {
            x0 = ((ow - ow * (new_aspect / old_aspect)) / 2.0).round_ties_even() as usize;
        } else if old_aspect < new_aspect {
            y0 = ((oh - oh * (old_aspect / new_aspect)) / 2.0).round_ties_even() as usize;
        }
        cw = img.width.saturating_sub(2 * x0).max(1);
        ch = img.height.saturating_sub(2 * y0).max(1);
    }
    let frames = map_frames(img, |f| {
        let src: Vec<f32> = (0..ch)
            .flat_map(|y| {
                let start = ((y + y0) * img.width + x0) * 3;
                f[start..start + cw * 3].iter().copied()
            })
            .collect();
        Arc::new(resize(&src, cw, ch, tw, th, method))
    });
    Ok(single(ImageBatch { width: tw, height: th, frames }))
}

fn resize(src: &[f32], sw: usize, sh: usize, tw: usize, th: usize, method: &str) -> Vec<f32> {
    let sx = sw as f32 / tw as f32;
    let sy = sh as f32 / th as f32;
    let mut out = vec![0f32; tw * th * 3];
    match method {
        "nearest-exact" => {
            for y in 0..th {
                let yy = (((y as f32 + 0.5) * sy).floor() as usize).min(sh - 1);
                for x in 0..tw {
                    let xx = (((x as f32 + 0.5) * sx).floor() as usize).min(sw - 1);
                    out[(y * tw + x) * 3..(y * tw + x) * 3 + 3]
                        .copy_from_slice(&src[(yy * sw + xx) * 3..(yy * sw + xx) * 3 + 3]);
                }
            }
        }
        "bilinear" => {
            let coord = |d: usize, scale: f32, n: usize| -> (usize, usize, f32) {
                let s = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(n - 1);
                let i1 = (i0 + 1).min(n - 1);
                (i0, i1, s - i0 as f32)
            };
            for y in 0..th {
                let (y0, y1, fy) = coord(y, sy, sh);
                for x in 0..tw {
                    let (x0, x1, fx) = coord(x, sx, sw);
                    for c in 0..3 {
                        let p = |yy: usize, xx: usize| src[(yy * sw + xx) * 3 + c];
                        let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                        let bottom = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                        out[(y * tw + x) * 3 + c] = top * (1.0 - fy) + bottom * fy;
                    }
                }
            }
        }
        "area" => {
            // adaptive_avg_pool2d
            for y in 0..th {
                let ys = (y * sh) / th;
                let ye = ((y + 1) * sh).div_ceil(th);
                for x in 0..tw {
                    let xs = (x * sw) / tw;
                    let xe = ((x + 1) * sw).div_ceil(tw);
                    let n = ((ye - ys) * (xe - xs)) as f32;
                    for c in 0..3 {
                        let mut acc = 0f32;
                        for yy in ys..ye {
                            for xx in xs..xe {
                                acc += src[(yy * sw + xx) * 3 + c];
                            }
                        }
                        out[(y * tw + x) * 3 + c] = acc / n;
                    }
                }
            }
        }
        _ => {
            let filter = if method == "lanczos" {
                image::imageops::FilterType::Lanczos3
            } else {
                image::imageops::FilterType::CatmullRom
            };
            let buf: ImageBuffer<Rgb<f32>, Vec<f32>> =
                ImageBuffer::from_raw(sw as u32, sh as u32, src.to_vec()).unwrap_or_default();
            let resized = image::imageops::resize(&buf, tw as u32, th as u32, filter);
            out = resized.into_raw();
        }
    }
    out
}

/// `folder_paths.get_save_image_path` + SaveImage/PreviewImage's loop.
fn save_images(
    img: &ImageBatch,
    filename_prefix: &str,
    output_dir: &Path,
    kind: &str,
    texts: &[(String, String)],
) -> Result<NodeOutput, NodeFailure> {
    let prefix = filename_prefix
        .replace("%width%", &img.width.to_string())
        .replace("%height%", &img.height.to_string());
    let (subfolder, filename) = match prefix.rsplit_once('/') {
        Some((dir, file)) => (dir.trim_start_matches('/').to_string(), file.to_string()),
        None => (String::new(), prefix.clone()),
    };
    if subfolder.split('/').any(|c| c == "..") || prefix.starts_with('/') {
        return Err(NodeFailure::error(
            "Exception",
            format!(
                "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}",
                output_dir.join(&subfolder).display(),
                output_dir.display()
            ),
        ));
    }
    let folder = output_dir.join(&subfolder);
    std::fs::create_dir_all(&folder).map_err(|e| NodeFailure::error("OSError", e.to_string()))?;
    let first = next_counter(&folder, &filename);
    let mut results = Vec::new();
    for (counter, batch_number) in (first..).zip(0..img.frames.len()) {
        let name = filename.replace("%batch_num%", &batch_number.to_string());
        let file = format!("{name}_{counter:05}_.png");
        let png = encode_png(&img.to_rgb8(batch_number), texts)?;
        std::fs::write(folder.join(&file), png).map_err(|e| NodeFailure::error("OSError", e.to_string()))?;
        results.push(json!({"filename": file, "subfolder": subfolder, "type": kind}));
    }
    Ok(NodeOutput { outputs: Vec::new(), ui: Some(json!({"images": results})) })
}

/// Highest `<prefix>_NNNNN_` counter in `folder`, plus one.
fn next_counter(folder: &Path, filename: &str) -> u64 {
    let prefix_len = filename.len();
    let mut best = 0u64;
    if let Ok(rd) = std::fs::read_dir(folder) {
        for entry in rd.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name.len() <= prefix_len
                || !name.is_char_boundary(prefix_len)
                || !name.is_char_boundary(prefix_len + 1)
            {
                continue;
            }
            let (head, rest) = name.split_at(prefix_len + 1);
            if !head.ends_with('_') || !head[..prefix_len].eq_ignore_ascii_case(filename) {
                continue;
            }
            let digits = rest.split('_').next().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
            best = best.max(digits);
        }
    }
    best + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invert_truncates_like_numpy() {
        // float32 `1 - 200/255` times 255 is 54.999996, which numpy's astype(uint8) truncates to 54.
        let img =
            ImageBatch { width: 1, height: 1, frames: vec![Arc::new(vec![1.0f32 - 200.0f32 / 255.0f32; 3])] };
        assert_eq!(img.to_rgb8(0).as_raw(), &vec![54, 54, 54]);
    }

    #[test]
    fn save_counter_skips_other_prefixes_and_multibyte_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["a_00003_.png", "a_00001_.png", "ab_00009_.png", "é_00004_.png", "aé_00002_.png"] {
            std::fs::write(dir.path().join(f), b"x").expect("write");
        }
        assert_eq!(next_counter(dir.path(), "a"), 4);
        assert_eq!(next_counter(dir.path(), "é"), 5);
        assert_eq!(next_counter(dir.path(), "new"), 1);
    }

    #[test]
    fn empty_image_color_channels() {
        let out = empty_image(2, 1, 1, 0x336699).ok().and_then(|o| o.outputs.into_iter().next());
        let Some(NodeValue::Image(img)) = out else { panic!("no image") };
        assert_eq!(img.to_rgb8(0).as_raw(), &vec![0x33, 0x66, 0x99, 0x33, 0x66, 0x99]);
    }

    #[test]
    fn object_info_knows_every_class() {
        assert_eq!(class_names().count(), 10);
        assert!(traits("SaveImage").is_some_and(|t| t.output_node));
        assert_eq!(return_types("GetImageSize"), vec!["INT", "INT", "INT"]);
    }
}

#[cfg(test)]
mod pixel_tests {
    use super::*;

    fn batch(w: usize, h: usize, f: impl Fn(usize, usize, usize) -> f32) -> ImageBatch {
        let mut frame = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    frame.push(f(x, y, c));
                }
            }
        }
        ImageBatch { width: w, height: h, frames: vec![Arc::new(frame)] }
    }

    fn image_of(out: NodeOutput) -> Arc<ImageBatch> {
        match out.outputs.into_iter().next() {
            Some(NodeValue::Image(img)) => img,
            other => panic!("expected an image, got {other:?}"),
        }
    }

    /// ComfyUI's Blur written the direct way: a 2D gaussian over linspace(-1, 1) with reflect padding.
    #[test]
    fn blur_matches_a_direct_2d_convolution() {
        let img = batch(9, 7, |x, y, c| ((x * 7 + y * 13 + c * 5) % 11) as f32 / 10.0);
        let (r, sigma) = (2usize, 0.8f32);
        let out = image_of(blur(&img, r as i64, f64::from(sigma)).expect("blur"));
        let k = 2 * r + 1;
        let lin = |i: usize| -1.0f32 + 2.0 * i as f32 / (k as f32 - 1.0);
        let mut kernel = vec![0f32; k * k];
        for i in 0..k {
            for j in 0..k {
                let d2 = lin(i) * lin(i) + lin(j) * lin(j);
                kernel[i * k + j] = (-d2 / (2.0 * sigma * sigma)).exp();
            }
        }
        let sum: f32 = kernel.iter().sum();
        let reflect = |i: isize, n: usize| -> usize {
            let n = n as isize;
            let i = if i < 0 { -i } else { i };
            (if i >= n { 2 * (n - 1) - i } else { i }) as usize
        };
        for y in 0..7 {
            for x in 0..9 {
                for c in 0..3 {
                    let mut acc = 0f32;
                    for i in 0..k {
                        for j in 0..k {
                            let sy = reflect(y as isize + i as isize - r as isize, 7);
                            let sx = reflect(x as isize + j as isize - r as isize, 9);
                            acc += kernel[i * k + j] / sum * img.frames[0][(sy * 9 + sx) * 3 + c];
                        }
                    }
                    let got = out.frames[0][(y * 9 + x) * 3 + c];
                    assert!((got - acc).abs() < 1e-5, "({x},{y},{c}): {got} vs {acc}");
                }
            }
        }
    }

    #[test]
    fn bilinear_halving_averages_2x2_blocks() {
        let img = batch(4, 4, |x, y, _| if (x + y) % 2 == 0 { 1.0 } else { 0.0 });
        let out = image_of(scale(&img, "bilinear", 2, 2, "disabled").expect("scale"));
        assert!(out.frames[0].iter().all(|v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn scale_keeps_aspect_when_one_side_is_zero_and_crops_center() {
        let img = batch(40, 20, |x, _, _| x as f32 / 40.0);
        let out = image_of(scale(&img, "nearest-exact", 10, 0, "disabled").expect("scale"));
        assert_eq!((out.width, out.height), (10, 5));
        let out = image_of(scale(&img, "area", 10, 10, "center").expect("scale"));
        assert_eq!((out.width, out.height), (10, 10));
        // The center crop drops 10 columns on each side: the leftmost output averages columns 10..12.
        assert!((out.frames[0][0] - 10.5 / 40.0).abs() < 1e-6);
    }

    #[test]
    fn oversized_frames_fail_like_an_allocation_error() {
        match empty_image(16384, 16384, 1, 0) {
            Err(NodeFailure::Error { exception_type, .. }) => assert_eq!(exception_type, "RuntimeError"),
            other => panic!("expected an allocation error, got {other:?}"),
        }
    }

    #[test]
    fn empty_image_batches_share_one_buffer() {
        let img = image_of(empty_image(16, 16, 24, 0x123456).expect("empty"));
        assert!(Arc::ptr_eq(&img.frames[0], &img.frames[23]));
    }
}
