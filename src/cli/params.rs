//! `--param name=value` parsed against the workflow's schema (from `WorkflowService.GetWorkflow`), so
//! `width=64` is sent as an integer and `sigma=1.5` as a float. Ranges and everything else are left to
//! the server, which reports every problem at once.

use std::collections::HashMap;
use std::path::Path;

use super::error::CliError;
use crate::proto::pb;

/// Largest image file the client reads (the server's default message limit fits 32 MiB images).
const MAX_IMAGE_BYTES: u64 = 48 * 1024 * 1024;

/// What `--param` values and the positional image turn into.
#[derive(Debug, Default)]
pub(crate) struct Inputs {
    pub(crate) image: Option<pb::InputImage>,
    pub(crate) prompt: Option<String>,
    pub(crate) parameters: HashMap<String, pb::ParameterValue>,
}

/// Splits `name=value`.
pub(crate) fn split_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// Reads an image file into an `InputImage` (the file name is kept; the server sniffs the type).
pub(crate) fn read_image(path: &Path) -> Result<pb::InputImage, CliError> {
    let io = |source| CliError::Io { what: format!("reading {}", path.display()), source };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_IMAGE_BYTES {
        return Err(CliError::Usage(format!(
            "{} is {len} bytes; images of at most {MAX_IMAGE_BYTES} bytes can be sent",
            path.display()
        )));
    }
    let data = std::fs::read(path).map_err(io)?;
    let filename = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(pb::InputImage { data: data.into(), filename, content_type: String::new() })
}

/// Builds the request inputs: the positional image, `--prompt`, and each `--param` typed by the schema.
/// `image` and `prompt` given as `--param` fill the request's fields of those names.
///
/// # Errors
/// [`CliError::Usage`] naming the parameter: unknown names (listing the known ones), values that do not
/// parse as the input's type, choices not offered, unreadable image files.
pub(crate) fn build(
    workflow: &pb::Workflow,
    image: Option<&Path>,
    prompt: Option<String>,
    params: &[(String, String)],
) -> Result<Inputs, CliError> {
    let mut inputs = Inputs { image: image.map(read_image).transpose()?, prompt, ..Inputs::default() };
    for (name, raw) in params {
        let Some(spec) = workflow.inputs.iter().find(|i| &i.name == name) else {
            let known: Vec<&str> = workflow.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(CliError::Usage(format!(
                "workflow `{}` has no input `{name}`; it takes: {}",
                workflow.name,
                if known.is_empty() { "(no inputs)".to_string() } else { known.join(", ") }
            )));
        };
        let value = parse_value(spec, raw)?;
        match (name.as_str(), value.kind) {
            ("image", Some(pb::parameter_value::Kind::ImageValue(img))) => inputs.image = Some(img),
            ("prompt", Some(pb::parameter_value::Kind::StringValue(s))) => inputs.prompt = Some(s),
            (_, kind) => {
                inputs.parameters.insert(name.clone(), pb::ParameterValue { kind });
            }
        }
    }
    Ok(inputs)
}

/// One value, typed by its input's declared type.
fn parse_value(spec: &pb::WorkflowInput, raw: &str) -> Result<pb::ParameterValue, CliError> {
    use pb::parameter_value::Kind;
    let bad = |what: &str| CliError::Usage(format!("--param {}={raw:?}: expected {what}", spec.name));
    let kind = match pb::InputType::try_from(spec.r#type).unwrap_or(pb::InputType::Unspecified) {
        pb::InputType::Int | pb::InputType::Seed => {
            Kind::IntValue(raw.trim().parse().map_err(|_| bad("an integer"))?)
        }
        pb::InputType::Float => Kind::FloatValue(raw.trim().parse().map_err(|_| bad("a number"))?),
        pb::InputType::Bool => Kind::BoolValue(match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" | "on" => true,
            "false" | "no" | "0" | "off" => false,
            _ => return Err(bad("true or false")),
        }),
        pb::InputType::Choice => {
            if !spec.choices.is_empty() && !spec.choices.iter().any(|c| c == raw) {
                return Err(bad(&format!("one of {}", spec.choices.join(", "))));
            }
            Kind::StringValue(raw.to_string())
        }
        pb::InputType::Image => {
            Kind::ImageValue(read_image(Path::new(raw.strip_prefix('@').unwrap_or(raw)))?)
        }
        pb::InputType::Text | pb::InputType::Unspecified => Kind::StringValue(raw.to_string()),
    };
    Ok(pb::ParameterValue { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::parameter_value::Kind;

    fn input(name: &str, kind: pb::InputType, choices: &[&str]) -> pb::WorkflowInput {
        pb::WorkflowInput {
            name: name.into(),
            r#type: kind as i32,
            choices: choices.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }
    }

    fn workflow() -> pb::Workflow {
        pb::Workflow {
            name: "scale-blur".into(),
            inputs: vec![
                input("width", pb::InputType::Int, &[]),
                input("sigma", pb::InputType::Float, &[]),
                input("crop", pb::InputType::Choice, &["disabled", "center"]),
                input("flip", pb::InputType::Bool, &[]),
                input("prompt", pb::InputType::Text, &[]),
            ],
            ..Default::default()
        }
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn values_take_the_declared_type() {
        let inputs = build(
            &workflow(),
            None,
            None,
            &pairs(&[
                ("width", "64"),
                ("sigma", "1.5"),
                ("crop", "center"),
                ("flip", "yes"),
                ("prompt", "a cat"),
            ]),
        )
        .expect("valid");
        let kind = |n: &str| inputs.parameters.get(n).and_then(|v| v.kind.clone());
        assert_eq!(kind("width"), Some(Kind::IntValue(64)));
        assert_eq!(kind("sigma"), Some(Kind::FloatValue(1.5)));
        assert_eq!(kind("crop"), Some(Kind::StringValue("center".into())));
        assert_eq!(kind("flip"), Some(Kind::BoolValue(true)));
        assert_eq!(inputs.prompt.as_deref(), Some("a cat"));
        assert!(!inputs.parameters.contains_key("prompt"));
    }

    #[test]
    fn bad_values_name_the_parameter() {
        let err =
            |p: &[(&str, &str)]| build(&workflow(), None, None, &pairs(p)).expect_err("invalid").to_string();
        assert!(err(&[("width", "wide")]).contains("--param width=\"wide\": expected an integer"));
        assert!(err(&[("crop", "all")]).contains("one of disabled, center"));
        let unknown = err(&[("hieght", "3")]);
        assert!(unknown.contains("no input `hieght`") && unknown.contains("width, sigma"), "{unknown}");
        assert!(split_pair("=3").is_err() && split_pair("a=b=c").is_ok_and(|(k, v)| k == "a" && v == "b=c"));
    }
}
