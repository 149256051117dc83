//! Catalog tests through its public interface: loading the bundled workflows, preparing requests
//! (every violation and its field), injection properties, and reloading.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn bundled_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows")
}

fn bundled() -> Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG
        .get_or_init(|| {
            Catalog::load(&bundled_dir()).unwrap_or_else(|e| panic!("bundled workflows must load: {e}"))
        })
        .clone()
}

fn png() -> ImageInput {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(2, 2, image::Rgb([10, 20, 30]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("encode png: {e}"));
    ImageInput {
        data: Bytes::from(out.into_inner()),
        filename: "photo.png".into(),
        content_type: String::new(),
    }
}

fn inputs(image: Option<ImageInput>, prompt: Option<&str>, params: &[(&str, ParamValue)]) -> JobInputs {
    JobInputs {
        image,
        prompt: prompt.map(str::to_string),
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

fn named(name: &str, inputs: JobInputs) -> Result<PreparedJob, Vec<FieldViolation>> {
    bundled().prepare(WorkflowSource::Named(name.into()), inputs, None)
}

fn fields(result: Result<PreparedJob, Vec<FieldViolation>>) -> Vec<String> {
    match result {
        Ok(job) => panic!("expected violations, got {job:?}"),
        Err(v) => v.into_iter().map(|v| v.field).collect(),
    }
}

fn input_of<'a>(graph: &'a Value, node: &str, input: &str) -> &'a Value {
    &graph[node]["inputs"][input]
}

/// `/object_info` for the emulator's nodes, as captured from ComfyUI 0.3.64.
fn emulator_object_info() -> Value {
    json!({
        "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": true}]}}, "output": ["IMAGE", "MASK"], "output_node": false},
        "ImageInvert": {"input": {"required": {"image": ["IMAGE"]}}, "output": ["IMAGE"], "output_node": false},
        "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                      "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}, "output": [], "output_node": true},
        "EmptyImage": {"input": {"required": {"width": ["INT", {"default": 512, "min": 1, "max": 16384}],
            "height": ["INT", {"default": 512, "min": 1, "max": 16384}], "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            "color": ["INT", {"default": 0, "min": 0, "max": 16777215}]}}, "output": ["IMAGE"], "output_node": false},
        "ImageBlur": {"input": {"required": {"image": ["IMAGE", {}], "blur_radius": ["INT", {"default": 1, "min": 1, "max": 31}],
            "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0}]}}, "output": ["IMAGE"], "output_node": false},
        "ImageScale": {"input": {"required": {"image": ["IMAGE"], "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
            "width": ["INT", {"default": 512, "min": 0, "max": 16384}], "height": ["INT", {"default": 512, "min": 0, "max": 16384}],
            "crop": [["disabled", "center"]]}}, "output": ["IMAGE"], "output_node": false},
        "SaveImageWebsocket": {"input": {"required": {"images": ["IMAGE"]}}, "output": [], "output_node": true},
    })
}

// ----- loading -------------------------------------------------------------------------------------

#[test]
fn every_bundled_workflow_loads() {
    let catalog = bundled();
    let names: Vec<String> = catalog.list().iter().map(|w| w.name.clone()).collect();
    assert_eq!(
        names,
        ["invert", "progress-websocket", "scale-blur", "sd15-img2img", "sdxl-img2img", "upscale-esrgan"]
    );
    for workflow in catalog.list() {
        assert!(!workflow.outputs.is_empty(), "{} declares its outputs", workflow.name);
        assert!(!workflow.description.is_empty(), "{} has a description", workflow.name);
    }
    for name in ["sd15-img2img", "sdxl-img2img", "upscale-esrgan"] {
        let wf = catalog.get(name).unwrap_or_else(|| panic!("{name}"));
        assert!(wf.requirements.runcomfy_workflow_version_id.is_some(), "{name} names a RunComfy version");
        assert!(wf.requirements.server_type.is_some(), "{name} names a server type");
    }
    assert_eq!(catalog.get("invert").map(|w| w.requirements.clone()), Some(Requirements::default()));
}

#[test]
fn the_model_free_workflows_fit_the_emulator() {
    let info = emulator_object_info();
    for (name, image) in [("invert", Some(png())), ("scale-blur", Some(png())), ("progress-websocket", None)]
    {
        let job =
            bundled().prepare(WorkflowSource::Named(name.into()), inputs(image, None, &[]), Some(&info));
        assert!(job.is_ok(), "{name}: {job:?}");
    }
}

#[test]
fn load_reports_every_bad_file_with_its_path() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_workflow(&bundled_dir().join("invert"), &dir.path().join("invert"));
    std::fs::create_dir(dir.path().join("broken")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("broken").join(MANIFEST_FILE), "name = \"broken\"\nversion = 1\n")
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(bundled_dir().join("invert").join(GRAPH_FILE), dir.path().join("broken").join(GRAPH_FILE))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(dir.path().join("empty")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(dir.path().join("ui")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("ui").join(MANIFEST_FILE), "name = \"ui\"\nversion = \"1\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("ui").join(GRAPH_FILE), r#"{"nodes": [], "links": []}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("README.md"), "ignored").unwrap_or_else(|e| panic!("{e}"));
    let Err(CatalogError::Invalid(problems)) = Catalog::load(dir.path()) else {
        panic!("bad files must be rejected");
    };
    let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 4, "{shown:?}");
    assert!(
        problems[0].path.ends_with("broken/manifest.toml") && problems[0].reason.contains("invalid type"),
        "{shown:?}"
    );
    assert!(
        problems[1].path.ends_with("empty/manifest.toml") && problems[1].reason.contains("cannot read"),
        "{shown:?}"
    );
    assert!(
        problems[2].path.ends_with("empty/workflow.json") && problems[2].reason.contains("cannot read"),
        "{shown:?}"
    );
    assert!(
        problems[3].path.ends_with("ui/workflow.json") && problems[3].reason.contains("Export (API)"),
        "{shown:?}"
    );
    assert!(matches!(Catalog::load(&dir.path().join("absent")), Err(CatalogError::ReadDir { .. })));
}

fn copy_workflow(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for file in [MANIFEST_FILE, GRAPH_FILE] {
        std::fs::copy(from.join(file), to.join(file)).unwrap_or_else(|e| panic!("{e}"));
    }
}

// ----- preparing named workflows -------------------------------------------------------------------

#[test]
fn an_image_becomes_an_upload_slot_and_inject_uploaded_sets_the_name() {
    let job = named("invert", inputs(Some(png()), None, &[])).unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(job.workflow, "invert");
    assert_eq!(job.workflow_version, "1.0.0");
    assert_eq!(job.images.len(), 1);
    let slot = &job.images[0];
    assert_eq!(slot.input, "image");
    assert_eq!(slot.targets, vec![InputTarget::new("1", "image")]);
    assert_eq!(slot.image.content_type, "image/png", "sniffed when empty");
    assert_eq!(slot.image.filename, "photo.png");
    assert_eq!(input_of(&job.graph, "1", "image"), "comfyrelay:pending-upload:image");
    let summary = &job.summary["image"];
    assert!(summary.starts_with("photo.png (image/png, ") && summary.contains("sha256 "), "{summary}");
    assert_eq!(job.summary["filename_prefix"], "comfyrelay-invert (default)");

    let mut graph = job.graph.clone();
    inject_uploaded(&mut graph, &slot.targets, "photo (1).png");
    assert_eq!(input_of(&graph, "1", "image"), "photo (1).png");
    inject_uploaded(&mut graph, &[InputTarget::new("99", "image")], "x.png"); // absent: ignored
    assert_eq!(graph.as_object().map(|m| m.len()), Some(3));
}

#[test]
fn values_defaults_and_choices_are_injected() {
    let job = named(
        "scale-blur",
        inputs(
            Some(png()),
            None,
            &[
                ("width", ParamValue::Int(100)),
                ("sigma", ParamValue::Int(2)),
                ("upscale_method", ParamValue::String("lanczos".into())),
            ],
        ),
    )
    .unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(input_of(&job.graph, "2", "width"), 100);
    assert_eq!(input_of(&job.graph, "2", "height"), 512);
    assert_eq!(input_of(&job.graph, "3", "sigma"), 2.0, "an int given for a float becomes a float");
    assert_eq!(input_of(&job.graph, "2", "upscale_method"), "lanczos");
    assert_eq!(job.summary["width"], "100");
    assert_eq!(job.summary["height"], "512 (default)");
}

#[test]
fn every_violation_is_reported_at_once_with_its_field() {
    let result = named(
        "scale-blur",
        inputs(
            None,
            Some("a cat"),
            &[
                ("width", ParamValue::String("wide".into())),
                ("height", ParamValue::Int(20_000)),
                ("sigma", ParamValue::Float(f64::NAN)),
                ("blur_radius", ParamValue::Float(3.0)),
                ("upscale_method", ParamValue::String("magic".into())),
                ("crop", ParamValue::Image(png())),
                ("colour", ParamValue::Bool(true)),
            ],
        ),
    );
    let violations = result.err().unwrap_or_default();
    let by_field: BTreeMap<&str, &str> =
        violations.iter().map(|v| (v.field.as_str(), v.description.as_str())).collect();
    assert_eq!(violations.len(), 9, "{violations:#?}");
    assert!(by_field["prompt"].contains("has no input named `prompt`"), "{by_field:?}");
    assert!(by_field["parameters[colour]"].contains("unknown input `colour`"), "{by_field:?}");
    assert!(
        by_field["parameters[width]"].contains("wrong type")
            && by_field["parameters[width]"].contains("int_value")
    );
    assert!(
        by_field["parameters[height]"].contains("out of range: it must be between 0 and 16384"),
        "{by_field:?}"
    );
    assert!(by_field["parameters[sigma]"].contains("not a finite number"), "{by_field:?}");
    assert!(by_field["parameters[blur_radius]"].contains("wrong type"), "{by_field:?}");
    assert!(by_field["parameters[upscale_method]"].contains("not among the choices"), "{by_field:?}");
    assert!(by_field["parameters[crop]"].contains("got an image"), "{by_field:?}");
    assert!(by_field["image"].contains("missing required input `image`"), "{by_field:?}");
}

#[test]
fn unknown_workflows_are_reported_on_the_workflow_field() {
    let violations = named("nope", JobInputs::default()).err().unwrap_or_default();
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].field, "workflow");
    assert!(
        violations[0].description.contains("unknown workflow `nope`")
            && violations[0].description.contains("invert")
    );
}

#[test]
fn request_fields_and_parameters_conflict_and_bad_images_are_rejected() {
    assert_eq!(
        fields(named("invert", inputs(Some(png()), None, &[("image", ParamValue::Image(png()))]))),
        ["image"]
    );
    let not_an_image = ImageInput {
        data: Bytes::from_static(b"hello"),
        filename: String::new(),
        content_type: String::new(),
    };
    let violations = named("invert", inputs(Some(not_an_image), None, &[])).err().unwrap_or_default();
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].field, "image");
    assert!(violations[0].description.contains("not a PNG, JPEG or WebP"));
    let empty = ImageInput { data: Bytes::new(), ..png() };
    assert_eq!(
        fields(named("invert", inputs(None, None, &[("image", ParamValue::Image(empty))]))),
        ["parameters[image]"]
    );
}

#[test]
fn unsafe_or_missing_file_names_are_replaced() {
    let odd = ImageInput { filename: "../../etc/.passwd".into(), ..png() };
    let job = named("invert", inputs(Some(odd), None, &[])).unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(job.images[0].image.filename, "passwd");
    let unnamed = ImageInput { filename: String::new(), ..png() };
    let job = named("invert", inputs(Some(unnamed), None, &[])).unwrap_or_else(|v| panic!("{v:?}"));
    let name = &job.images[0].image.filename;
    assert!(
        name.starts_with("input-") && name.ends_with(".png") && name.len() == "input-".len() + 12 + 4,
        "{name}"
    );
}

#[test]
fn a_missing_required_prompt_is_reported_on_the_prompt_field() {
    assert_eq!(fields(named("sd15-img2img", inputs(Some(png()), None, &[]))), ["prompt"]);
    assert_eq!(
        fields(named("sd15-img2img", inputs(Some(png()), Some(""), &[]))),
        ["prompt"],
        "empty is unset"
    );
}

#[test]
fn an_unset_seed_is_randomised_and_recorded_and_a_given_seed_is_used() {
    let job =
        named("sd15-img2img", inputs(Some(png()), Some("a cat"), &[])).unwrap_or_else(|v| panic!("{v:?}"));
    let seed = input_of(&job.graph, "7", "seed").as_i64().unwrap_or(-1);
    assert!((0..=MAX_RANDOM_SEED).contains(&seed), "{seed}");
    assert_eq!(job.summary["seed"], seed.to_string(), "the seed used, as a plain number");
    assert_eq!(input_of(&job.graph, "5", "text"), "a cat");
    assert_eq!(job.summary["prompt"], "a cat");
    assert_eq!(job.requirements.server_type.as_deref(), Some("medium"));

    let job = named("sd15-img2img", inputs(Some(png()), Some("a cat"), &[("seed", ParamValue::Int(42))]))
        .unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(input_of(&job.graph, "7", "seed"), 42);
    assert_eq!(job.summary["seed"], "42");
    assert_eq!(
        fields(named("sd15-img2img", inputs(Some(png()), Some("x"), &[("seed", ParamValue::Int(-1))]))),
        ["parameters[seed]"]
    );
}

#[test]
fn long_text_is_cut_in_the_summary_but_not_in_the_graph() {
    let long = "a".repeat(1000);
    let job =
        named("sd15-img2img", inputs(Some(png()), Some(&long), &[])).unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(input_of(&job.graph, "5", "text"), long.as_str());
    assert!(job.summary["prompt"].ends_with("… (1000 characters)"));
}

#[test]
fn the_backend_object_info_is_checked_and_attributed() {
    // A backend without the checkpoint and with fewer samplers than the manifest offers.
    let info = json!({
        "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["other.safetensors"]]}}, "output": ["MODEL", "CLIP", "VAE"]},
        "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": true}]}}, "output": ["IMAGE", "MASK"]},
        "ImageScale": emulator_object_info()["ImageScale"].clone(),
        "VAEEncode": {"input": {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}}, "output": ["LATENT"]},
        "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": true}], "clip": ["CLIP"]}}, "output": ["CONDITIONING"]},
        "KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"min": 0, "max": 18446744073709551615_u64}],
            "steps": ["INT", {"min": 1, "max": 10000}], "cfg": ["FLOAT", {"min": 0.0, "max": 100.0}],
            "sampler_name": [["euler", "ddim"]], "scheduler": ["COMBO", {"options": ["normal", "karras"]}],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": ["FLOAT", {"min": 0.0, "max": 1.0}]}}, "output": ["LATENT"]},
        "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}, "output": ["IMAGE"]},
    });
    let result = bundled().prepare(
        WorkflowSource::Named("sd15-img2img".into()),
        inputs(Some(png()), Some("a cat"), &[("sampler", ParamValue::String("uni_pc".into()))]),
        Some(&info),
    );
    let violations = result.err().unwrap_or_default();
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["workflow", "parameters[sampler]", "workflow"], "{violations:#?}");
    assert!(
        violations[0].description.contains("ckpt_name")
            && violations[0].description.contains("other.safetensors")
    );
    assert!(violations[1].description.contains("\"uni_pc\" is not among the backend's choices"));
    assert!(violations[2].description.contains("class_type `SaveImage` is not available"));
}

// ----- inline graphs --------------------------------------------------------------------------------

const INLINE: &str = r#"{
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "positive", "clip": ["1", 1]}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "negative", "clip": ["1", 1]}},
    "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
    "6": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
          "denoise": 1, "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}},
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
    "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "x"}}
}"#;

fn inline(text: &str, inputs: JobInputs) -> Result<PreparedJob, Vec<FieldViolation>> {
    bundled().prepare(WorkflowSource::Inline(text.into()), inputs, None)
}

#[test]
fn inline_graphs_take_parameters_by_node_and_input() {
    let job = inline(
        INLINE,
        inputs(
            Some(png()),
            Some("a dog"),
            &[
                ("6.steps", ParamValue::Int(4)),
                ("6.cfg", ParamValue::Float(3.5)),
                ("6.denoise", ParamValue::Float(0.5)),
                ("4.text", ParamValue::String("ugly".into())),
            ],
        ),
    )
    .unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(job.workflow, INLINE_WORKFLOW);
    assert!(job.workflow_version.starts_with("sha256:") && job.workflow_version.len() == 7 + 16);
    assert_eq!(input_of(&job.graph, "6", "steps"), 4);
    assert_eq!(input_of(&job.graph, "6", "cfg"), 3.5);
    assert_eq!(input_of(&job.graph, "3", "text"), "a dog", "the prompt goes to the positive encoder");
    assert_eq!(input_of(&job.graph, "4", "text"), "ugly");
    assert_eq!(input_of(&job.graph, "6", "seed"), 5, "inline seeds run as given");
    assert_eq!(job.images.len(), 1);
    assert_eq!(job.images[0].targets, vec![InputTarget::new("2", "image")]);
    assert_eq!(job.summary["6.steps"], "4");
    assert_eq!(job.requirements, Requirements::default());
}

#[test]
fn inline_graph_violations_name_their_fields() {
    let result = inline(
        INLINE,
        inputs(
            None,
            None,
            &[
                ("9.steps", ParamValue::Int(4)),
                ("6.model", ParamValue::String("x".into())),
                ("6.nope", ParamValue::Int(1)),
                ("6.steps", ParamValue::String("many".into())),
                ("6.cfg", ParamValue::Bool(true)),
                ("6.seed", ParamValue::Image(png())),
                ("steps", ParamValue::Int(1)),
            ],
        ),
    );
    let violations = result.err().unwrap_or_default();
    let by_field: BTreeMap<&str, &str> =
        violations.iter().map(|v| (v.field.as_str(), v.description.as_str())).collect();
    assert_eq!(violations.len(), 7, "{violations:#?}");
    assert!(by_field["parameters[9.steps]"].contains("no node matches"), "{by_field:?}");
    assert!(by_field["parameters[6.model]"].contains("connected to another node"), "{by_field:?}");
    assert!(by_field["parameters[6.nope]"].contains("node 6 (KSampler) has no input `nope`"), "{by_field:?}");
    assert!(by_field["parameters[6.steps]"].contains("wrong type"), "{by_field:?}");
    assert!(by_field["parameters[6.cfg]"].contains("wrong type"), "{by_field:?}");
    assert!(by_field["parameters[6.seed]"].contains("got an image"), "{by_field:?}");
    assert!(by_field["parameters[steps]"].contains("node_id.input_name"), "{by_field:?}");
}

#[test]
fn inline_image_and_prompt_need_one_place_to_go() {
    let two_loaders = r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
                          "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
                          "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}"#;
    let violations = inline(two_loaders, inputs(Some(png()), Some("hi"), &[])).err().unwrap_or_default();
    assert_eq!(violations.len(), 2, "{violations:#?}");
    assert_eq!(violations[0].field, "image");
    assert!(violations[0].description.contains("2 LoadImage nodes (1, 2)"));
    assert_eq!(violations[1].field, "prompt");
    assert!(violations[1].description.contains("no CLIPTextEncode"));
    // Images by parameter work for each loader.
    let job = inline(
        two_loaders,
        inputs(None, None, &[("1.image", ParamValue::Image(png())), ("2.image", ParamValue::Image(png()))]),
    )
    .unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(job.images.len(), 2);
    assert_eq!(input_of(&job.graph, "2", "image"), "comfyrelay:pending-upload:2.image");
    // The field and a parameter for the same place conflict.
    assert_eq!(
        fields(inline(INLINE, inputs(Some(png()), None, &[("2.image", ParamValue::Image(png()))]))),
        ["image"]
    );
}

#[test]
fn malformed_inline_graphs_are_reported_on_graph_json() {
    let ui = inline(r#"{"last_node_id": 3, "nodes": [], "links": []}"#, JobInputs::default())
        .err()
        .unwrap_or_default();
    assert_eq!(ui.len(), 1);
    assert_eq!(ui[0].field, "graph_json");
    assert!(ui[0].description.contains("UI-format") && ui[0].description.contains("Export (API)"));
    let broken = r#"{"1": {"inputs": {}}, "2": {"class_type": "A", "inputs": {"x": ["3", 0]}},
                     "3": {"class_type": "B", "inputs": {"y": ["2", 0], "z": ["7", 0]}}}"#;
    let violations = inline(broken, JobInputs::default()).err().unwrap_or_default();
    assert!(violations.iter().all(|v| v.field == "graph_json"), "{violations:#?}");
    let text: Vec<&str> = violations.iter().map(|v| v.description.as_str()).collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text.iter().any(|t| t.contains("node 1 has no `class_type`")));
    assert!(text.iter().any(|t| t.contains("links to node 7")));
    assert!(text.iter().any(|t| t.contains("cycle")));
    assert_eq!(fields(inline("not json", JobInputs::default())), ["graph_json"]);
}

#[test]
fn inline_graphs_are_checked_against_object_info() {
    let graph = r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 40, "sigma": 1.0}},
                    "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}"#;
    let info = emulator_object_info();
    let result = bundled().prepare(
        WorkflowSource::Inline(graph.into()),
        inputs(None, None, &[("1.width", ParamValue::Int(0))]),
        Some(&info),
    );
    let violations = result.err().unwrap_or_default();
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["parameters[1.width]", "graph_json", "graph_json"], "{violations:#?}");
    assert!(violations[0].description.contains("smaller than the minimum 1"));
    assert!(violations[1].description.contains("blur_radius"));
    assert!(violations[2].description.contains("PreviewImage"));
}

// ----- properties -----------------------------------------------------------------------------------

/// Every (node, input) whose value differs between two graphs.
fn changed(before: &Value, after: &Value) -> Vec<InputTarget> {
    let mut out = Vec::new();
    for (node, body) in after.as_object().into_iter().flatten() {
        for (input, value) in body["inputs"].as_object().into_iter().flatten() {
            if before[node.as_str()]["inputs"].get(input) != Some(value) {
                out.push(InputTarget::new(node.as_str(), input.as_str()));
            }
        }
    }
    out.sort();
    out
}

/// The numeric (int) inputs of the bundled workflows, with their ranges.
fn int_inputs() -> Vec<(String, InputSpec)> {
    bundled()
        .list()
        .iter()
        .flat_map(|w| {
            w.inputs
                .iter()
                .filter(|i| i.kind == InputKind::Int)
                .map(|i| (w.name.clone(), i.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn required_inputs(workflow: &Workflow) -> JobInputs {
    JobInputs {
        image: workflow.input("image").map(|_| png()),
        prompt: workflow.input("prompt").map(|_| "p".to_string()),
        parameters: workflow
            .input("seed")
            .map(|_| ("seed".to_string(), ParamValue::Int(7)))
            .into_iter()
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_int_in_range_lands_at_every_target_and_nowhere_else(pick in any::<prop::sample::Index>(), raw in any::<u64>()) {
        let candidates = int_inputs();
        let (name, spec) = pick.get(&candidates).clone();
        let lo = spec.min.unwrap_or(-1e6) as i64;
        let hi = spec.max.unwrap_or(1e6) as i64;
        let value = lo + (raw % ((hi - lo) as u64 + 1)) as i64;
        let workflow = bundled().get(&name).unwrap_or_else(|| panic!("{name}"));
        let mut request = required_inputs(&workflow);
        request.parameters.insert(spec.name.clone(), ParamValue::Int(value));
        let job = named(&name, request).unwrap_or_else(|v| panic!("{v:?}"));
        for target in &spec.targets {
            prop_assert_eq!(input_of(&job.graph, &target.node_id, &target.input_name), &json!(value));
        }
        let mut allowed: Vec<InputTarget> = spec.targets.clone();
        for other in &workflow.inputs {
            if matches!(other.kind, InputKind::Image | InputKind::Seed) || (other.name == "prompt") {
                allowed.extend(other.targets.iter().cloned());
            }
        }
        for target in changed(&workflow.graph, &job.graph) {
            prop_assert!(allowed.contains(&target), "{} changed", target);
        }
        prop_assert_eq!(job.summary.get(&spec.name), Some(&value.to_string()));
    }

    #[test]
    fn out_of_range_ints_are_rejected_on_their_field(pick in any::<prop::sample::Index>(), above in any::<bool>(), by in 1i64..1_000_000) {
        let candidates = int_inputs();
        let (name, spec) = pick.get(&candidates).clone();
        let value = if above { spec.max.map(|m| m as i64 + by) } else { spec.min.map(|m| m as i64 - by) };
        prop_assume!(value.is_some());
        let workflow = bundled().get(&name).unwrap_or_else(|| panic!("{name}"));
        let mut request = required_inputs(&workflow);
        request.parameters.insert(spec.name.clone(), ParamValue::Int(value.unwrap_or_default()));
        let violations = named(&name, request).err().unwrap_or_default();
        prop_assert_eq!(violations.len(), 1);
        prop_assert_eq!(&violations[0].field, &format!("parameters[{}]", spec.name));
        prop_assert!(violations[0].description.contains("out of range"));
    }

    #[test]
    fn seeds_are_random_when_unset_and_always_recorded(given in proptest::option::of(0i64..=i64::MAX)) {
        let mut request = inputs(Some(png()), Some("p"), &[]);
        if let Some(seed) = given {
            request.parameters.insert("seed".into(), ParamValue::Int(seed));
        }
        let job = named("sdxl-img2img", request).unwrap_or_else(|v| panic!("{v:?}"));
        let used = input_of(&job.graph, "7", "seed").as_i64().unwrap_or(-1);
        match given {
            Some(seed) => {
                prop_assert_eq!(used, seed);
                prop_assert_eq!(&job.summary["seed"], &seed.to_string());
            }
            None => {
                prop_assert!((0..=MAX_RANDOM_SEED).contains(&used));
                prop_assert_eq!(&job.summary["seed"], &used.to_string());
            }
        }
    }

    #[test]
    fn choices_are_accepted_exactly(pick in any::<prop::sample::Index>(), other in "[a-z_]{1,12}") {
        let workflow = bundled().get("sd15-img2img").unwrap_or_else(|| panic!("sd15"));
        let spec = workflow.input("sampler").unwrap_or_else(|| panic!("sampler")).clone();
        let choice = pick.get(&spec.choices).clone();
        let mut request = required_inputs(&workflow);
        request.parameters.insert("sampler".into(), ParamValue::String(choice.clone()));
        let job = named("sd15-img2img", request).unwrap_or_else(|v| panic!("{v:?}"));
        prop_assert_eq!(input_of(&job.graph, "7", "sampler_name"), &json!(choice));
        let mut request = required_inputs(&workflow);
        request.parameters.insert("sampler".into(), ParamValue::String(other.clone()));
        let accepted = named("sd15-img2img", request).is_ok();
        prop_assert_eq!(accepted, spec.choices.contains(&other));
    }

    #[test]
    fn arbitrary_requests_never_panic(
        source in prop_oneof![
            "invert|scale-blur|sd15-img2img|nope".prop_map(WorkflowSource::Named),
            ".{0,100}".prop_map(WorkflowSource::Inline),
            Just(WorkflowSource::Inline(INLINE.to_string())),
        ],
        params in prop::collection::btree_map(
            "image|prompt|seed|steps|width|sigma|6\\.steps|2\\.image|3\\.text|1\\.x|[a-z.]{0,6}",
            prop_oneof![
                ".{0,10}".prop_map(ParamValue::String),
                any::<i64>().prop_map(ParamValue::Int),
                any::<f64>().prop_map(ParamValue::Float),
                any::<bool>().prop_map(ParamValue::Bool),
                prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| ParamValue::Image(ImageInput {
                    data: Bytes::from(b), filename: String::new(), content_type: String::new() })),
            ],
            0..6,
        ),
        prompt in proptest::option::of(".{0,10}"),
        with_info in any::<bool>(),
    ) {
        let info = emulator_object_info();
        let request = JobInputs { image: None, prompt, parameters: params };
        let _ = bundled().prepare(source, request, with_info.then_some(&info));
    }
}

// ----- reloading --------------------------------------------------------------------------------------

async fn wait_for_status(catalog: &Catalog, what: &str, f: impl FnMut(&ReloadStatus) -> bool) {
    let mut status = catalog.status();
    match tokio::time::timeout(Duration::from_secs(20), status.wait_for(f)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("status channel closed while waiting for {what}: {e}"),
        Err(_) => panic!("timed out waiting for {what}; status: {:?}", *catalog.status().borrow()),
    }
}

#[tokio::test]
async fn a_bad_file_is_rejected_and_the_last_good_catalog_stays() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = root.path().join("workflows");
    let staging = root.path().join("staging");
    copy_workflow(&bundled_dir().join("invert"), &dir.join("invert"));
    let catalog = Catalog::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let cancel = CancellationToken::new();
    let task = catalog.watch(cancel.clone());
    wait_for_status(&catalog, "the watcher", |s| s.watching).await;

    // A good new workflow, moved in whole.
    copy_workflow(&bundled_dir().join("scale-blur"), &staging.join("scale-blur"));
    std::fs::rename(staging.join("scale-blur"), dir.join("scale-blur")).unwrap_or_else(|e| panic!("{e}"));
    let seen = catalog.clone();
    wait_for_status(&catalog, "the good reload", |_| seen.get("scale-blur").is_some()).await;

    // A bad one: the reload is rejected, and the last good catalog stays in service.
    std::fs::create_dir_all(staging.join("bad")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(staging.join("bad").join(MANIFEST_FILE), "name = \"bad\"\nversion = \"1\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(staging.join("bad").join(GRAPH_FILE), "{\"1\": {}}").unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(staging.join("bad"), dir.join("bad")).unwrap_or_else(|e| panic!("{e}"));
    wait_for_status(&catalog, "the rejected reload", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("bad/workflow.json") && e.contains("class_type"))
    })
    .await;
    let names: Vec<String> = catalog.list().iter().map(|w| w.name.clone()).collect();
    assert_eq!(names, ["invert", "scale-blur"]);

    // Fixing it is picked up again.
    std::fs::remove_dir_all(dir.join("bad")).unwrap_or_else(|e| panic!("{e}"));
    wait_for_status(&catalog, "the recovery", |s| s.last_error.is_none() && s.generation >= 3).await;

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("the watch task must stop on cancel"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!catalog.status().borrow().watching);
}

#[test]
fn reload_keeps_the_last_good_catalog() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_workflow(&bundled_dir().join("invert"), &root.path().join("invert"));
    let catalog = Catalog::load(root.path()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(root.path().join("invert").join(GRAPH_FILE), "[]").unwrap_or_else(|e| panic!("{e}"));
    assert!(catalog.reload().is_err());
    assert!(catalog.get("invert").is_some());
    let status = catalog.status().borrow().clone();
    assert_eq!((status.generation, status.attempts), (1, 1));
    assert!(status.last_error.is_some_and(|e| e.contains("invert/workflow.json")));
}

#[test]
fn a_catalog_can_be_built_from_parsed_workflows() {
    let manifest =
        std::fs::read_to_string(bundled_dir().join("invert").join(MANIFEST_FILE)).unwrap_or_default();
    let graph = std::fs::read_to_string(bundled_dir().join("invert").join(GRAPH_FILE)).unwrap_or_default();
    let workflow = parse_workflow("invert", &manifest, &graph).unwrap_or_else(|e| panic!("{e:?}"));
    let catalog = Catalog::from_workflows(Path::new("unused"), vec![workflow.clone()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(catalog.get("invert").as_deref(), Some(&workflow));
    assert!(matches!(
        Catalog::from_workflows(Path::new("unused"), vec![workflow.clone(), workflow]),
        Err(CatalogError::Invalid(p)) if p.len() == 1
    ));
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_workflow(&bundled_dir().join("invert"), &root.path().join("invert"));
    let catalog = Catalog::load(root.path()).unwrap_or_else(|e| panic!("{e}"));
    let cancel = CancellationToken::new();
    let task = catalog.watch(cancel.clone());
    // `watching` is set only once the SIGHUP handler is installed, so the signal cannot kill the process.
    wait_for_status(&catalog, "the watcher", |s| s.watching).await;
    let before = catalog.status().borrow().attempts;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(status.success());
    // Nothing changed on disk, so only the signal can cause this reload.
    wait_for_status(&catalog, "the SIGHUP reload", |s| s.attempts > before && s.last_error.is_none()).await;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("the watch task must stop on cancel"))
        .unwrap_or_else(|e| panic!("{e}"));
}

// ----- bundled workflows and the overlay directory ---------------------------------------------------------

#[test]
fn the_bundled_catalog_is_the_repository_workflows() {
    let embedded = Catalog::with_bundled(None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(embedded.dir(), None);
    let from_disk = bundled_dir_catalog_names();
    let names: Vec<String> = embedded.list().iter().map(|w| w.name.clone()).collect();
    assert_eq!(names, from_disk);
    for name in &from_disk {
        assert_eq!(embedded.get(name), bundled().get(name), "{name}");
    }
}

fn bundled_dir_catalog_names() -> Vec<String> {
    bundled().list().iter().map(|w| w.name.clone()).collect()
}

#[test]
fn an_overlay_adds_and_overrides_by_name_and_only_it_reloads() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // `invert` overridden (another description), `invert-copy` added.
    copy_workflow(&bundled_dir().join("invert"), &root.path().join("invert"));
    let manifest_path = root.path().join("invert").join(MANIFEST_FILE);
    let manifest = std::fs::read_to_string(&manifest_path).unwrap_or_else(|e| panic!("{e}"));
    let overridden = manifest.replace("Inverts the colours of an image.", "Local override.");
    std::fs::write(&manifest_path, &overridden).unwrap_or_else(|e| panic!("{e}"));
    copy_workflow(&bundled_dir().join("invert"), &root.path().join("invert-copy"));
    std::fs::write(
        root.path().join("invert-copy").join(MANIFEST_FILE),
        manifest.replace("name = \"invert\"", "name = \"invert-copy\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let catalog = Catalog::with_bundled(Some(root.path())).unwrap_or_else(|e| panic!("{e}"));
    let mut expected = bundled_dir_catalog_names();
    expected.push("invert-copy".into());
    expected.sort();
    let names: Vec<String> = catalog.list().iter().map(|w| w.name.clone()).collect();
    assert_eq!(names, expected);
    assert_eq!(catalog.get("invert").map(|w| w.description.clone()).as_deref(), Some("Local override."));

    // Removing the override brings the bundled one back; the added one goes.
    std::fs::remove_dir_all(root.path().join("invert")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_dir_all(root.path().join("invert-copy")).unwrap_or_else(|e| panic!("{e}"));
    catalog.reload().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(catalog.get("invert"), bundled().get("invert"));
    assert!(catalog.get("invert-copy").is_none());

    // A missing overlay directory is an error naming it.
    let missing = root.path().join("absent");
    let e = Catalog::with_bundled(Some(&missing)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("absent"), "{e}");
}
