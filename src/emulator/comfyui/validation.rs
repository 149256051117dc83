//! `execution.validate_prompt` re-implemented: the same error types, messages, `extra_info` shapes and
//! partial-validity rules as ComfyUI 0.3.64, including the quirks (an inner exception is reported on the
//! linked node with the *outer* input's name; a cycle ends as `prompt_outputs_failed_validation` with empty
//! `node_errors`; values are converted in place, so the queued prompt carries the converted values).
//! With [`ComfyVersion::V0_38`], `execution.py` @`04e2a91`: an unknown or missing class is
//! `missing_node_type` (with `extra_info {node_id, class_type, node_title}`) and a cycle gives each node on
//! it a `dependency_cycle` error.
//! Knows the node specs through [`super::nodes`] and nothing about queues or sockets.

use super::ComfyVersion;
use super::nodes::{self, Dirs};
use super::pyjson::{py_repr, py_str};
use serde_json::{Map, Value, json};

/// Python's recursion limit stands in for a cycle detector, as in ComfyUI 0.3.64.
const MAX_DEPTH: usize = 64;
/// 0.38 detects cycles itself; only very deep chains still hit Python's recursion limit.
const MAX_DEPTH_NEWER: usize = 300;

/// The result of validating a POST /prompt body's `prompt`.
#[derive(Debug)]
pub(crate) enum Validation {
    /// At least one output validated: run these outputs; `node_errors` lists the failed ones.
    Accepted { outputs: Vec<String>, node_errors: Map<String, Value> },
    /// HTTP 400 `{"error": .., "node_errors": ..}`.
    Rejected { error: Value, node_errors: Map<String, Value> },
    /// ComfyUI would raise: plain-text 500.
    Crash,
}

struct PyException {
    exception_type: &'static str,
    message: String,
    traceback: Vec<String>,
}

const TB_INNER: &str = "  File \"/opt/ComfyUI/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";
const TB_KEY: &str = "  File \"/opt/ComfyUI/execution.py\", line 788, in validate_inputs\n    o_class_type = prompt[o_id]['class_type']\n                   ~~~~~~^^^^^^\n";
const TB_INDEX: &str = "  File \"/opt/ComfyUI/execution.py\", line 790, in validate_inputs\n    received_type = r[val[1]]\n                    ~^^^^^^^^\n";
const TB_INPUTS: &str = "  File \"/opt/ComfyUI/execution.py\", line 744, in validate_inputs\n    inputs = prompt[unique_id]['inputs']\n             ~~~~~~~~~~~~~~~~~^^^^^^^^^^\n";

type Verdict = (bool, Vec<Value>);

struct Validator<'a> {
    prompt: &'a mut Map<String, Value>,
    dirs: &'a Dirs,
    validated: Vec<(String, Verdict)>,
    visiting: Vec<String>,
    newer: bool,
}

impl Validator<'_> {
    fn get_validated(&self, id: &str) -> Option<&Verdict> {
        self.validated.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    fn set_validated(&mut self, id: &str, verdict: Verdict) {
        match self.validated.iter_mut().find(|(k, _)| k == id) {
            Some(slot) => slot.1 = verdict,
            None => self.validated.push((id.to_string(), verdict)),
        }
    }

    fn validate_inputs(&mut self, unique_id: &str, depth: usize) -> Result<Verdict, PyException> {
        if let Some(v) = self.get_validated(unique_id) {
            return Ok(v.clone());
        }
        if self.newer
            && let Some(start) = self.visiting.iter().position(|v| v == unique_id)
        {
            return Ok(self.dependency_cycle(start, unique_id));
        }
        // CPython recurses around a cycle until RecursionError; raising when the cycle closes leaves the
        // same final `validated` state (every node on the cycle is overwritten by its outer frame).
        let max_depth = if self.newer { MAX_DEPTH_NEWER } else { MAX_DEPTH };
        if depth > max_depth || self.visiting.iter().any(|v| v == unique_id) {
            return Err(PyException {
                exception_type: "RecursionError",
                message: "maximum recursion depth exceeded".into(),
                traceback: vec![TB_INNER.into()],
            });
        }
        self.visiting.push(unique_id.to_string());
        let result = self.validate_node(unique_id, depth);
        self.visiting.pop();
        result
    }

    /// 0.38: every node on the cycle `visiting[start..] + [unique_id]` gets a `dependency_cycle` error.
    fn dependency_cycle(&mut self, start: usize, unique_id: &str) -> Verdict {
        let mut path: Vec<String> = self.visiting[start..].to_vec();
        path.push(unique_id.to_string());
        let mut cycle_nodes: Vec<String> = Vec::new();
        for n in &path {
            if !cycle_nodes.contains(n) {
                cycle_nodes.push(n.clone());
            }
        }
        let class =
            |id: &str| self.prompt.get(id).and_then(|n| n.get("class_type")).map(py_str).unwrap_or_default();
        let cycle_path: Vec<String> = path.iter().map(|id| format!("{id} ({})", class(id))).collect();
        let details = cycle_path.join(" -> ");
        for node_id in &cycle_nodes {
            let error = json!({
                "type": "dependency_cycle",
                "message": "Dependency cycle detected",
                "details": details,
                "extra_info": {"node_id": node_id, "cycle_nodes": cycle_nodes}
            });
            self.set_validated(node_id, (false, vec![error]));
        }
        self.get_validated(unique_id).cloned().unwrap_or((false, Vec::new()))
    }

    fn validate_node(&mut self, unique_id: &str, depth: usize) -> Result<Verdict, PyException> {
        let node = self.prompt.get(unique_id).cloned().unwrap_or(Value::Null);
        let class_type = node.get("class_type").map(py_str).unwrap_or_default();
        let Some(inputs) = node.get("inputs").and_then(Value::as_object).cloned() else {
            return Err(PyException {
                exception_type: "KeyError",
                message: "'inputs'".into(),
                traceback: vec![TB_INPUTS.into()],
            });
        };
        let info = nodes::object_info(&class_type, &self.dirs.input).unwrap_or(Value::Null);
        let traits = nodes::traits(&class_type);
        let validates_image = traits.is_some_and(|t| t.validates_image);
        let mut errors: Vec<Value> = Vec::new();
        let mut valid = true;
        let mut converted: Vec<(String, Value)> = Vec::new();

        for category in ["required", "optional"] {
            let Some(specs) = info.pointer(&format!("/input/{category}")).and_then(Value::as_object) else {
                continue;
            };
            for (x, spec) in specs {
                let input_type = spec.get(0).cloned().unwrap_or(Value::Null);
                let extra = spec.get(1).cloned().unwrap_or_else(|| json!({}));
                let input_config = json!([input_type.clone(), extra.clone()]);
                let Some(val) = inputs.get(x) else {
                    if category == "required" {
                        errors.push(json!({
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": x,
                            "extra_info": {"input_name": x}
                        }));
                    }
                    continue;
                };
                if let Value::Array(link) = val {
                    if link.len() != 2 {
                        errors.push(json!({
                            "type": "bad_linked_input",
                            "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            "details": x,
                            "extra_info": {"input_name": x, "input_config": input_config, "received_value": val}
                        }));
                        continue;
                    }
                    let o_id = match &link[0] {
                        Value::String(s) if self.prompt.contains_key(s) => s.clone(),
                        other => {
                            return Err(PyException {
                                exception_type: "KeyError",
                                message: py_repr(other),
                                traceback: vec![TB_KEY.into()],
                            });
                        }
                    };
                    let o_class = self
                        .prompt
                        .get(&o_id)
                        .and_then(|n| n.get("class_type"))
                        .map(py_str)
                        .unwrap_or_default();
                    let returns = nodes::return_types(&o_class);
                    let received_type = match &link[1] {
                        Value::Number(n) if n.is_i64() => {
                            let i = n.as_i64().unwrap_or(0);
                            let idx = if i < 0 { returns.len() as i64 + i } else { i };
                            match usize::try_from(idx).ok().and_then(|i| returns.get(i)) {
                                Some(t) => t.clone(),
                                None => {
                                    return Err(PyException {
                                        exception_type: "IndexError",
                                        message: "tuple index out of range".into(),
                                        traceback: vec![TB_INDEX.into()],
                                    });
                                }
                            }
                        }
                        other => {
                            let tname = match other {
                                Value::String(_) => "str",
                                Value::Number(_) => "float",
                                Value::Null => "NoneType",
                                Value::Bool(_) => "bool",
                                Value::Array(_) => "list",
                                Value::Object(_) => "dict",
                            };
                            return Err(PyException {
                                exception_type: "TypeError",
                                message: format!("tuple indices must be integers or slices, not {tname}"),
                                traceback: vec![TB_INDEX.into()],
                            });
                        }
                    };
                    if !type_matches(&received_type, &input_type) {
                        let input_type_str = py_str(&input_type);
                        errors.push(json!({
                            "type": "return_type_mismatch",
                            "message": "Return type mismatch between linked nodes",
                            "details": format!("{x}, received_type({received_type}) mismatch input_type({input_type_str})"),
                            "extra_info": {"input_name": x, "input_config": input_config, "received_type": received_type, "linked_node": val}
                        }));
                        continue;
                    }
                    match self.validate_inputs(&o_id, depth + 1) {
                        Ok((false, _)) => {
                            valid = false;
                            continue;
                        }
                        Ok(_) => {}
                        Err(ex) => {
                            valid = false;
                            let mut traceback = vec![TB_INNER.to_string()];
                            traceback.extend(ex.traceback);
                            let reasons = vec![json!({
                                "type": "exception_during_inner_validation",
                                "message": "Exception when validating inner node",
                                "details": ex.message,
                                "extra_info": {
                                    "input_name": x,
                                    "input_config": input_config,
                                    "exception_message": ex.message,
                                    "exception_type": ex.exception_type,
                                    "traceback": traceback,
                                    "linked_node": val
                                }
                            })];
                            self.set_validated(&o_id, (false, reasons));
                            continue;
                        }
                    }
                } else {
                    let mut val = val.clone();
                    if let Some(inner) = val.get("__value__") {
                        val = inner.clone();
                        converted.push((x.clone(), val.clone()));
                    }
                    let type_name = input_type.as_str().unwrap_or("");
                    match convert(&val, type_name) {
                        Ok(Some(v)) => {
                            val = v;
                            converted.push((x.clone(), val.clone()));
                        }
                        Ok(None) => {}
                        Err(msg) => {
                            errors.push(json!({
                                "type": "invalid_input_type",
                                "message": format!("Failed to convert an input value to a {type_name} value"),
                                "details": format!("{x}, {}, {msg}", py_str(&val)),
                                "extra_info": {"input_name": x, "input_config": input_config, "received_value": val, "exception_message": msg}
                            }));
                            continue;
                        }
                    }
                    let skip_checks = validates_image && x == "image";
                    if skip_checks {
                        continue;
                    }
                    if let (Some(min), Some(v)) = (extra.get("min").and_then(Value::as_f64), val.as_f64())
                        && v < min
                    {
                        errors.push(json!({
                                "type": "value_smaller_than_min",
                                "message": format!("Value {} smaller than min of {}", py_str(&val), py_str(&extra["min"])),
                                "details": x,
                                "extra_info": {"input_name": x, "input_config": input_config, "received_value": val}
                            }));
                        continue;
                    }
                    if let (Some(max), Some(v)) = (extra.get("max").and_then(Value::as_f64), val.as_f64())
                        && v > max
                    {
                        errors.push(json!({
                                "type": "value_bigger_than_max",
                                "message": format!("Value {} bigger than max of {}", py_str(&val), py_str(&extra["max"])),
                                "details": x,
                                "extra_info": {"input_name": x, "input_config": input_config, "received_value": val}
                            }));
                        continue;
                    }
                    if let Value::Array(options) = &input_type
                        && !options.iter().any(|o| py_eq(o, &val))
                    {
                        let (list_info, cfg) = if options.len() > 20 {
                            (format!("(list of length {})", options.len()), Value::Null)
                        } else {
                            (py_repr(&input_type), input_config.clone())
                        };
                        // 0.38 lists `repr()` of each invalid value; 0.3.64 quoted `str()`.
                        let shown = if self.newer { py_repr(&val) } else { format!("'{}'", py_str(&val)) };
                        errors.push(json!({
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": format!("{x}: {shown} not in {list_info}"),
                            "extra_info": {"input_name": x, "input_config": cfg, "received_value": val}
                        }));
                        continue;
                    }
                }
            }
        }

        if validates_image && let Some(image) = inputs.get("image").filter(|v| !v.is_array()) {
            let name = py_str(image);
            let (file, _) = nodes::split_annotation(&name);
            let ok = !file.is_empty() && self.dirs.annotated_input_path(&name).is_file();
            if !ok {
                errors.push(json!({
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": format!("image - Invalid image file: {name}"),
                    "extra_info": {"input_name": "image"}
                }));
            }
        }

        // Conversions are written back into the prompt, as ComfyUI does (`inputs[x] = val`).
        if !converted.is_empty()
            && let Some(node_inputs) = self
                .prompt
                .get_mut(unique_id)
                .and_then(|n| n.get_mut("inputs"))
                .and_then(Value::as_object_mut)
        {
            for (k, v) in converted {
                node_inputs.insert(k, v);
            }
        }

        let verdict = if self.newer {
            // `ret = validated.get(unique_id, (True, [], unique_id))`: a cycle found below already put an
            // error on this node; join it.
            let (prior_ok, mut reasons) =
                self.get_validated(unique_id).cloned().unwrap_or((true, Vec::new()));
            let ok = prior_ok && valid && errors.is_empty();
            for e in errors {
                if !reasons.contains(&e) {
                    reasons.push(e);
                }
            }
            (ok, if ok { Vec::new() } else { reasons })
        } else if !errors.is_empty() || !valid {
            (false, errors)
        } else {
            (true, Vec::new())
        };
        self.set_validated(unique_id, verdict.clone());
        Ok(verdict)
    }
}

/// `validate_node_input`: exact match, `*` wildcard, or overlapping comma-separated unions.
fn type_matches(received: &str, input_type: &Value) -> bool {
    match input_type {
        Value::String(t) => {
            if received == t || received == "*" || t == "*" {
                return true;
            }
            let r: Vec<&str> = received.split(',').map(str::trim).collect();
            t.split(',').map(str::trim).any(|x| r.contains(&x))
        }
        Value::Array(_) => received == "*" || received == "COMBO",
        _ => false,
    }
}

/// Python `==` between JSON scalars (1 == 1.0).
fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Bool(x), Value::Number(y)) | (Value::Number(y), Value::Bool(x)) => {
            y.as_f64() == Some(f64::from(u8::from(*x)))
        }
        _ => a == b,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// `int(val)` / `float(val)` / `str(val)` / `bool(val)`; `Ok(None)` when the type needs no conversion.
fn convert(val: &Value, input_type: &str) -> Result<Option<Value>, String> {
    match input_type {
        "INT" => match val {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Some(val.clone())),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if f.is_nan() {
                    Err("cannot convert float NaN to integer".into())
                } else if f.is_infinite() {
                    Err("cannot convert float infinity to integer".into())
                } else {
                    Ok(Some(json!(f.trunc() as i64)))
                }
            }
            Value::Bool(b) => Ok(Some(json!(i64::from(*b)))),
            Value::String(s) => {
                let t = s.trim().replace('_', "");
                t.parse::<i64>()
                    .map(|i| Some(json!(i)))
                    .map_err(|_| format!("invalid literal for int() with base 10: {}", py_repr(val)))
            }
            other => Err(format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                type_name(other)
            )),
        },
        "FLOAT" => match val {
            Value::Number(n) => Ok(Some(json!(n.as_f64().unwrap_or(0.0)))),
            Value::Bool(b) => Ok(Some(json!(f64::from(u8::from(*b))))),
            Value::String(s) => {
                let t = s.trim().to_ascii_lowercase();
                let parsed = match t.as_str() {
                    "inf" | "+inf" | "infinity" => Some(f64::INFINITY),
                    "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
                    _ => t.parse::<f64>().ok().filter(|f| f.is_finite()),
                };
                match parsed {
                    Some(f) if f.is_finite() => Ok(Some(json!(f))),
                    _ => Err(format!("could not convert string to float: {}", py_repr(val))),
                }
            }
            other => {
                Err(format!("float() argument must be a string or a real number, not '{}'", type_name(other)))
            }
        },
        "STRING" => Ok(Some(Value::String(py_str(val)))),
        "BOOLEAN" => Ok(Some(Value::Bool(match val {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }))),
        _ => Ok(None),
    }
}

/// Validates `prompt` in place. `partial` restricts the outputs (`partial_execution_targets`).
pub(crate) fn validate_prompt(
    prompt: &mut Value,
    partial: Option<&[String]>,
    dirs: &Dirs,
    version: ComfyVersion,
) -> Validation {
    let newer = version == ComfyVersion::V0_38;
    let Some(map) = prompt.as_object_mut() else { return Validation::Crash };
    let mut outputs = Vec::new();
    for (x, node) in map.iter() {
        let Some(node) = node.as_object() else { return Validation::Crash };
        let title = node.get("_meta").and_then(|m| m.get("title")).filter(|t| !t.is_null()).map(py_str);
        let Some(class_type) = node.get("class_type") else {
            if newer {
                let shown = title.clone().unwrap_or_else(|| format!("ID #{x}"));
                return Validation::Rejected {
                    error: json!({
                        "type": "missing_node_type",
                        "message": format!("Node '{shown}' has no class_type. The workflow may be corrupted or a custom node is missing."),
                        "details": format!("Node ID '#{x}'"),
                        "extra_info": {"node_id": x, "class_type": null, "node_title": title}
                    }),
                    node_errors: Map::new(),
                };
            }
            return Validation::Rejected {
                error: json!({
                    "type": "invalid_prompt",
                    "message": "Cannot execute because a node is missing the class_type property.",
                    "details": format!("Node ID '#{x}'"),
                    "extra_info": {}
                }),
                node_errors: Map::new(),
            };
        };
        let class_name = py_str(class_type);
        let Some(traits) = nodes::traits(&class_name) else {
            if newer {
                let shown = title.clone().unwrap_or_else(|| class_name.clone());
                return Validation::Rejected {
                    error: json!({
                        "type": "missing_node_type",
                        "message": format!("Node '{shown}' not found. The custom node may not be installed."),
                        "details": format!("Node ID '#{x}'"),
                        "extra_info": {"node_id": x, "class_type": class_type, "node_title": shown}
                    }),
                    node_errors: Map::new(),
                };
            }
            return Validation::Rejected {
                error: json!({
                    "type": "invalid_prompt",
                    "message": format!("Cannot execute because node {class_name} does not exist."),
                    "details": format!("Node ID '#{x}'"),
                    "extra_info": {}
                }),
                node_errors: Map::new(),
            };
        };
        if traits.output_node && partial.is_none_or(|p| p.iter().any(|t| t == x)) {
            outputs.push(x.clone());
        }
    }
    if outputs.is_empty() {
        return Validation::Rejected {
            error: json!({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}),
            node_errors: Map::new(),
        };
    }
    // CPython iterates the `outputs` set in hash order; the captured servers showed reverse prompt order.
    outputs.reverse();

    let mut v = Validator { prompt: map, dirs, validated: Vec::new(), visiting: Vec::new(), newer };
    let mut good = Vec::new();
    let mut failed: Vec<Vec<Value>> = Vec::new();
    let mut node_errors = Map::new();
    for o in &outputs {
        let (valid, reasons) = match v.validate_inputs(o, 0) {
            Ok(verdict) => verdict,
            Err(ex) => {
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": ex.message,
                    "extra_info": {"exception_type": ex.exception_type, "traceback": ex.traceback}
                })];
                v.set_validated(o, (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good.push(o.clone());
            continue;
        }
        failed.push(reasons);
        for (node_id, (ok, reasons)) in &v.validated {
            if *ok || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                let class_type =
                    v.prompt.get(node_id).and_then(|n| n.get("class_type")).map(py_str).unwrap_or_default();
                json!({"errors": reasons, "dependent_outputs": [], "class_type": class_type})
            });
            if let Some(deps) = entry.get_mut("dependent_outputs").and_then(Value::as_array_mut) {
                deps.push(Value::String(o.clone()));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flatten()
            .map(|e| format!("{}: {}", py_str(&e["message"]), py_str(&e["details"])))
            .collect();
        return Validation::Rejected {
            error: json!({
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details.join("\n"),
                "extra_info": {}
            }),
            node_errors,
        };
    }
    Validation::Accepted { outputs: good, node_errors }
}

/// `get_input_info`-style lookup used by the executor: the type of input `name` of `class`.
pub(crate) fn input_names(class: &str, input_dir: &std::path::Path) -> Vec<String> {
    let info = nodes::object_info(class, input_dir).unwrap_or(Value::Null);
    let mut names = Vec::new();
    for category in ["required", "optional"] {
        if let Some(specs) = info.pointer(&format!("/input/{category}")).and_then(Value::as_object) {
            names.extend(specs.keys().cloned());
        }
    }
    names
}
