//! Bounds on what one caller can make comfyrelay hold, parse or quote back: per-field sizes, JSON nesting,
//! image pixels, and the one helper ([`echo`]) that shortens a caller-supplied value quoted in an error.
//!
//! The fixed bounds are the constants below; the configurable ones (`jobs.max_graph_bytes`,
//! `jobs.max_text_bytes`, `jobs.max_image_pixels`, and the connection bounds under `grpc.`) live in
//! [`crate::config`] and travel as [`RequestLimits`]. The README's "Limits" section lists every bound with
//! its setting. Knows nothing of gRPC.

use std::borrow::Cow;
use std::fmt;

/// Characters of a caller-supplied value quoted back in an error message; longer values are cut and end
/// with `…`.
pub const ECHO_MAX_CHARS: usize = 64;
/// Bytes of a name: workflow names, parameter names, machine ids, GetWorkflow / ListJobs filters.
pub const MAX_NAME_BYTES: usize = 128;
/// Entries of `SubmitJobRequest.parameters`.
pub const MAX_PARAMETERS: usize = 128;
/// Nesting levels of an inline graph's JSON (API-format graphs need 4 or 5).
pub const MAX_JSON_DEPTH: usize = 32;
/// Labels on a job (and label filters of ListJobs).
pub const MAX_LABELS: usize = 64;
/// Bytes of a label key.
pub const MAX_LABEL_KEY_BYTES: usize = 63;
/// Bytes of a label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Bytes of a `request_id`.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Bytes of an image's (or a downloaded output's) file name.
pub const MAX_FILENAME_BYTES: usize = 200;
/// Bytes of an image's content type (RFC 6838 allows 127 per name; parameters are not accepted).
pub const MAX_CONTENT_TYPE_BYTES: usize = 127;
/// Bytes of a cancellation reason.
pub const MAX_REASON_BYTES: usize = 1024;
/// Bytes of a page token (ours are far shorter).
pub const MAX_PAGE_TOKEN_BYTES: usize = 512;
/// State filters of ListJobs.
pub const MAX_STATE_FILTERS: usize = 16;

/// The setting of [`RequestLimits::max_graph_bytes`].
pub const SETTING_MAX_GRAPH_BYTES: &str = "jobs.max_graph_bytes";
/// The setting of [`RequestLimits::max_text_bytes`].
pub const SETTING_MAX_TEXT_BYTES: &str = "jobs.max_text_bytes";
/// The setting of [`RequestLimits::max_image_pixels`].
pub const SETTING_MAX_IMAGE_PIXELS: &str = "jobs.max_image_pixels";
/// The setting of the largest gRPC message.
pub const SETTING_MAX_MESSAGE_BYTES: &str = "grpc.max_message_bytes";

/// The configurable bounds on one request's fields (from `jobs.*` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Bytes of an inline graph (`graph_json`), checked before it is parsed.
    pub max_graph_bytes: usize,
    /// Bytes of the prompt and of each text parameter.
    pub max_text_bytes: usize,
    /// Pixels (width × height, as declared in the header) of each input image.
    pub max_image_pixels: u64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_graph_bytes: 1024 * 1024, max_text_bytes: 64 * 1024, max_image_pixels: 64 * 1024 * 1024 }
    }
}

/// What a bound counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes of text or data.
    Bytes,
    /// Entries of a list or map.
    Entries,
    /// Nesting levels of JSON.
    Levels,
    /// Pixels of an image (width × height).
    Pixels,
}

impl Unit {
    /// The unit's name, as in `ErrorInfo.metadata["unit"]`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bytes => "bytes",
            Self::Entries => "entries",
            Self::Levels => "levels",
            Self::Pixels => "pixels",
        }
    }
}

/// A bound a request field broke: which field, the limit, how far it went, and the setting that moves the
/// limit (`None` for fixed bounds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// The request field, e.g. `graph_json` or `parameters[prompt]`.
    pub field: String,
    /// The largest value allowed.
    pub limit: u64,
    /// What the request had, when it was measured whole (a depth scan stops at the limit).
    pub actual: Option<u64>,
    /// What the limit counts.
    pub unit: Unit,
    /// The configuration key of the limit, if it is configurable.
    pub setting: Option<&'static str>,
}

impl Exceeded {
    /// `field` holds `actual` where at most `limit` is allowed.
    pub fn new(field: impl Into<String>, actual: u64, limit: u64, unit: Unit) -> Self {
        Self { field: field.into(), limit, actual: Some(actual), unit, setting: None }
    }

    /// The same, naming the configuration key that sets the limit.
    pub fn with_setting(mut self, setting: &'static str) -> Self {
        self.setting = Some(setting);
        self
    }

    /// The same, for a measure that stopped at the limit.
    pub fn without_actual(mut self) -> Self {
        self.actual = None;
        self
    }

    /// A sentence for `BadRequest.FieldViolation.description`: the size, the limit and the setting.
    pub fn description(&self) -> String {
        let unit = self.unit.as_str();
        let what = match (self.unit, self.actual) {
            (Unit::Levels, _) => format!("nests more than {} levels deep", self.limit),
            (_, Some(actual)) => format!("has {actual} {unit}; at most {} are allowed", self.limit),
            (_, None) => format!("has more than {} {unit}", self.limit),
        };
        match self.setting {
            Some(setting) => format!("{what} (setting {setting})"),
            None => what,
        }
    }
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description())
    }
}

/// `value` cut to [`ECHO_MAX_CHARS`] characters (ending with `…` when cut): the only way a
/// caller-supplied value is quoted in an error, so an error never grows with the input.
pub fn echo(value: &str) -> Cow<'_, str> {
    clip(value, ECHO_MAX_CHARS)
}

/// `text` cut to `max_chars` characters, ending with `…` when cut.
pub fn clip(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!("{}…", &text[..end])),
    }
}

/// Whether JSON text nests more than `max` levels of objects and arrays, found by scanning its bytes
/// (strings and escapes respected) before any tree is built; the scan stops at the first level too deep.
/// Malformed JSON is left to the parser to report.
pub fn exceeds_json_depth(text: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_keeps_short_values_and_cuts_long_ones_on_a_char_boundary() {
        assert_eq!(echo("invert"), "invert");
        let long = "é".repeat(1000);
        let cut = echo(&long);
        assert_eq!(cut.chars().count(), ECHO_MAX_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(echo(&"a".repeat(ECHO_MAX_CHARS)).len(), ECHO_MAX_CHARS);
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert!(!exceeds_json_depth(r#"{"a": {"b": [1, 2]}}"#, 3));
        assert!(exceeds_json_depth(r#"{"a": {"b": [1, 2]}}"#, 2));
        assert!(!exceeds_json_depth(r#"{"a": "[[[[[[\"[[[["}"#, 1));
        assert!(exceeds_json_depth(&"[".repeat(100_000), MAX_JSON_DEPTH));
        assert!(!exceeds_json_depth("}}}]]]{", 1), "malformed text is the parser's to report");
    }

    #[test]
    fn descriptions_name_the_limit_and_the_setting() {
        let e = Exceeded::new("graph_json", 3_000_000, 2_097_152, Unit::Bytes)
            .with_setting(SETTING_MAX_GRAPH_BYTES);
        assert_eq!(
            e.description(),
            "has 3000000 bytes; at most 2097152 are allowed (setting jobs.max_graph_bytes)"
        );
        let d = Exceeded::new("graph_json", 0, 32, Unit::Levels).without_actual();
        assert_eq!(d.description(), "nests more than 32 levels deep");
    }
}
