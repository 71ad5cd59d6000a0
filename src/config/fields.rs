//! `[fields]`: the record's measured fields, their types and physical ranges.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// Keys the record always carries before the measured fields.
const RESERVED_KEYS: [&str; 3] = ["vehicle_id", "timestamp", "session_id"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Float,
    Int,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub ty: FieldType,
    pub min: f64,
    pub max: f64,
    /// Round float values to this many decimals (the sensor's resolution); none: as decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decimals: Option<u8>,
}

/// The four fields of the documented record schema, with their physical ranges.
pub fn default_fields() -> IndexMap<String, FieldSpec> {
    let f = |ty, min, max| FieldSpec {
        ty,
        min,
        max,
        decimals: (ty == FieldType::Float).then_some(1),
    };
    IndexMap::from([
        (
            "brake_disc_temp_fl".to_string(),
            f(FieldType::Float, -40.0, 1400.0),
        ),
        (
            "brake_disc_temp_fr".to_string(),
            f(FieldType::Float, -40.0, 1400.0),
        ),
        ("engine_rpm".to_string(), f(FieldType::Int, 0.0, 20000.0)),
        (
            "engine_oil_temp".to_string(),
            f(FieldType::Float, -40.0, 200.0),
        ),
    ])
}

/// The field table is not empty (checked before the source, which binds to the fields).
pub(super) fn validate_present(
    fields: &IndexMap<String, FieldSpec>,
) -> Result<(), (String, String)> {
    if fields.is_empty() {
        return Err(("fields".into(), "at least one field is needed".into()));
    }
    Ok(())
}

/// Every field: a snake_case name that is not a reserved key, and a sane range.
pub(super) fn validate(fields: &IndexMap<String, FieldSpec>) -> Result<(), (String, String)> {
    let e = |key: &str, msg: String| Err((key.to_string(), msg));
    for (name, spec) in fields {
        let key = format!("fields.{name}");
        let snake = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !snake {
            return e(
                &key,
                "field names must be lower-case snake_case (a-z, 0-9, _), as the Glue schema expects".into(),
            );
        }
        if RESERVED_KEYS.contains(&name.as_str()) {
            return e(&key, format!("`{name}` is a reserved record key"));
        }
        if spec.decimals.is_some_and(|d| d > 9) {
            return e(&format!("{key}.decimals"), "expected 0 to 9".into());
        }
        if !(spec.min.is_finite() && spec.max.is_finite() && spec.min <= spec.max) {
            return e(
                &key,
                format!(
                    "expected finite min <= max, got min = {}, max = {}",
                    spec.min, spec.max
                ),
            );
        }
    }
    Ok(())
}
