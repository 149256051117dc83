//! Checking one value against one input's type, range and choices; shared by manifest loading (defaults)
//! and request validation.

use serde_json::Value;

use super::model::{InputKind, InputSpec, ScalarValue};

/// Checks `value` against `spec` and returns the value to write (an int given for a float becomes a float).
///
/// # Errors
/// A description of the mismatch: wrong type, not finite, out of range, not among the choices.
pub(crate) fn fit(spec: &InputSpec, value: ScalarValue) -> Result<ScalarValue, String> {
    let value = match (spec.kind, value) {
        (InputKind::Text, v @ ScalarValue::Text(_)) | (InputKind::Bool, v @ ScalarValue::Bool(_)) => v,
        (InputKind::Int | InputKind::Seed, ScalarValue::Int(i)) => {
            check_range(spec, i as f64)?;
            ScalarValue::Int(i)
        }
        (InputKind::Float, ScalarValue::Int(i)) => {
            check_range(spec, i as f64)?;
            ScalarValue::Float(i as f64)
        }
        (InputKind::Float, ScalarValue::Float(f)) => {
            if !f.is_finite() {
                return Err(format!("{f} is not a finite number"));
            }
            check_range(spec, f)?;
            ScalarValue::Float(f)
        }
        (InputKind::Choice, ScalarValue::Text(s)) => {
            if !spec.choices.contains(&s) {
                return Err(format!(
                    "{:?} is not among the choices: {}",
                    crate::limits::echo(&s),
                    spec.choices.join(", ")
                ));
            }
            ScalarValue::Text(s)
        }
        (kind, other) => {
            return Err(format!(
                "wrong type: `{}` takes {}, got {}",
                spec.name,
                kind.expected(),
                describe(&other)
            ));
        }
    };
    Ok(value)
}

/// Checks the inclusive `min`/`max` of a numeric input.
///
/// # Errors
/// Which bound `x` breaks.
pub(crate) fn check_range(spec: &InputSpec, x: f64) -> Result<(), String> {
    let below = spec.min.is_some_and(|min| x < min);
    let above = spec.max.is_some_and(|max| x > max);
    if !(below || above) {
        return Ok(());
    }
    Err(match (spec.min, spec.max) {
        (Some(min), Some(max)) => format!("{x} is out of range: it must be between {min} and {max}"),
        (Some(min), None) => format!("{x} is out of range: it must be at least {min}"),
        (None, Some(max)) => format!("{x} is out of range: it must be at most {max}"),
        (None, None) => format!("{x} is out of range"),
    })
}

/// A short description of a value's type, for "wrong type" messages.
pub(crate) fn describe(value: &ScalarValue) -> &'static str {
    match value {
        ScalarValue::Text(_) => "a string",
        ScalarValue::Int(_) => "an integer",
        ScalarValue::Float(_) => "a float",
        ScalarValue::Bool(_) => "a boolean",
    }
}

/// Reads a literal graph value as a value of `kind`, if it is one (images read the file name as text).
pub(crate) fn scalar_from_json(kind: InputKind, value: &Value) -> Option<ScalarValue> {
    match (kind, value) {
        (InputKind::Text | InputKind::Choice | InputKind::Image, Value::String(s)) => {
            Some(ScalarValue::Text(s.clone()))
        }
        (InputKind::Int | InputKind::Seed, Value::Number(n)) => n.as_i64().map(ScalarValue::Int),
        (InputKind::Float, Value::Number(n)) => n.as_f64().map(ScalarValue::Float),
        (InputKind::Bool, Value::Bool(b)) => Some(ScalarValue::Bool(*b)),
        _ => None,
    }
}
