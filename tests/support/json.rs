//! An order-preserving JSON value and the checks of the record contract
//! (`/work/shared/DESIGN.md`, "The record" and "The message").
//!
//! `serde_json::Value` sorts object keys unless serde_json's `preserve_order`
//! feature happens to be on, so key order is checked on this type instead.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The documented keys of a record, in their documented order.
pub const RECORD_KEYS: [&str; 7] = [
    "vehicle_id",
    "timestamp",
    "session_id",
    "brake_disc_temp_fl",
    "brake_disc_temp_fr",
    "engine_rpm",
    "engine_oil_temp",
];

/// AWS IoT Core's message payload limit.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// The most records one message may carry.
pub const MAX_RECORDS_PER_MESSAGE: usize = 500;

/// A JSON value that keeps object keys in document order (and duplicates),
/// and tells JSON integers (no fraction, no exponent) from other numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn keys(&self) -> Vec<&str> {
        match self {
            Json::Obj(entries) => entries.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "bool",
            Json::Int(_) => "integer",
            Json::Float(_) => "float",
            Json::Str(_) => "string",
            Json::Arr(_) => "array",
            Json::Obj(_) => "object",
        }
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Int(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Json>()? {
            items.push(item);
        }
        Ok(Json::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Json>()? {
            entries.push((k, v));
        }
        Ok(Json::Obj(entries))
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

/// Strict parse of one JSON document (serde_json rejects NaN, Infinity and trailing text).
pub fn parse(text: &str) -> Result<Json, String> {
    serde_json::from_str::<Json>(text).map_err(|e| format!("invalid JSON ({e}): {text}"))
}

/// One reading, checked against the record contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub vehicle_id: String,
    pub timestamp: i64,
    pub session_id: String,
    /// brake_disc_temp_fl, brake_disc_temp_fr, engine_rpm, engine_oil_temp (None = null).
    pub values: [Option<f64>; 4],
    pub json: Json,
}

impl Record {
    pub fn has_null(&self) -> bool {
        self.values.iter().any(Option::is_none)
    }
}

/// Checks keys (exactly the 7, in order) and types of one record.
pub fn check_record(j: &Json) -> Result<Record, String> {
    let keys = j.keys();
    if !matches!(j, Json::Obj(_)) || keys != RECORD_KEYS {
        return Err(format!(
            "record keys must be exactly {RECORD_KEYS:?} in this order, got {keys:?} in {j:?}"
        ));
    }
    let vehicle_id = match j.get("vehicle_id") {
        Some(Json::Str(s)) if !s.is_empty() => s.clone(),
        other => {
            return Err(format!(
                "vehicle_id must be a non-empty string, got {other:?}"
            ));
        }
    };
    let timestamp = match j.get("timestamp") {
        Some(Json::Int(t)) => {
            i64::try_from(*t).map_err(|_| format!("timestamp {t} out of range"))?
        }
        other => return Err(format!("timestamp must be a JSON integer, got {other:?}")),
    };
    let session_id = match j.get("session_id") {
        Some(Json::Str(s)) if !s.is_empty() => s.clone(),
        other => {
            return Err(format!(
                "session_id must be a non-empty string, got {other:?}"
            ));
        }
    };
    let mut values = [None; 4];
    for (i, key) in RECORD_KEYS[3..].iter().enumerate() {
        let v = j.get(key).expect("key presence checked above");
        values[i] = match (key, v) {
            (_, Json::Null) => None,
            (&"engine_rpm", Json::Int(n)) => Some(*n as f64),
            (&"engine_rpm", other) => {
                return Err(format!(
                    "engine_rpm must be a JSON integer or null, got {} {other:?}",
                    other.kind()
                ));
            }
            (_, Json::Int(n)) => Some(*n as f64),
            (_, Json::Float(x)) if x.is_finite() => Some(*x),
            (_, other) => {
                return Err(format!(
                    "{key} must be a number or null, got {} {other:?}",
                    other.kind()
                ));
            }
        };
    }
    Ok(Record {
        vehicle_id,
        timestamp,
        session_id,
        values,
        json: j.clone(),
    })
}

/// How a message payload carries its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadMode {
    /// `{"records":[...]}`
    Records,
    /// one record object per message
    Single,
    /// either of the above (for runs without a config file)
    Any,
}

/// Checks one message payload (size, shape, record count, every record) and
/// returns its records. Records inside one message must be in time order.
pub fn check_message(payload: &str, mode: PayloadMode) -> Result<Vec<Record>, String> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "payload of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
            payload.len()
        ));
    }
    let j = parse(payload)?;
    let is_batch = j.keys() == ["records"];
    let records = match (mode, is_batch) {
        (PayloadMode::Records | PayloadMode::Any, true) => match j.get("records") {
            Some(Json::Arr(items)) => {
                if items.is_empty() || items.len() > MAX_RECORDS_PER_MESSAGE {
                    return Err(format!(
                        "a message must carry 1..={MAX_RECORDS_PER_MESSAGE} records, got {}",
                        items.len()
                    ));
                }
                items
                    .iter()
                    .map(check_record)
                    .collect::<Result<Vec<_>, _>>()?
            }
            other => return Err(format!("`records` must be an array, got {other:?}")),
        },
        (PayloadMode::Records, false) => {
            return Err(format!(
                "payload mode `records` wants exactly {{\"records\":[...]}}, got keys {:?}",
                j.keys()
            ));
        }
        (PayloadMode::Single | PayloadMode::Any, _) => vec![check_record(&j)?],
    };
    for w in records.windows(2) {
        if w[1].timestamp <= w[0].timestamp {
            return Err(format!(
                "records inside one message out of time order: {} then {}",
                w[0].timestamp, w[1].timestamp
            ));
        }
    }
    Ok(records)
}

/// What a set of records covers on the 100 ms grid.
#[derive(Debug)]
pub struct Coverage {
    /// Distinct readings, by timestamp.
    pub distinct: BTreeMap<i64, Record>,
    /// How many records repeated a timestamp already seen (identical content).
    pub duplicates: usize,
}

/// Groups records by timestamp. A duplicate must be the same reading (same
/// content); two different readings with one timestamp is an error.
pub fn coverage(records: &[Record]) -> Result<Coverage, String> {
    let mut distinct: BTreeMap<i64, Record> = BTreeMap::new();
    let mut duplicates = 0;
    for r in records {
        match distinct.get(&r.timestamp) {
            Some(seen) if seen.json != r.json => {
                return Err(format!(
                    "two different readings share timestamp {}: {:?} vs {:?}",
                    r.timestamp, seen.json, r.json
                ));
            }
            Some(_) => duplicates += 1,
            None => {
                distinct.insert(r.timestamp, r.clone());
            }
        }
    }
    Ok(Coverage {
        distinct,
        duplicates,
    })
}

/// Asserts that the distinct timestamps are exactly `start_ms + k*100` for k in 0..n.
pub fn assert_exact_grid(cov: &Coverage, start_ms: i64, n: i64) {
    assert_on_grid(cov, start_ms, n);
    let missing: Vec<i64> = (0..n)
        .map(|k| start_ms + k * 100)
        .filter(|t| !cov.distinct.contains_key(t))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {n} readings missing (gaps), first ones: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(cov.distinct.len() as i64, n);
}

/// Asserts that every timestamp is `start_ms + k*100` for some k in 0..n (gaps allowed).
pub fn assert_on_grid(cov: &Coverage, start_ms: i64, n: i64) {
    let off_grid: Vec<i64> = cov
        .distinct
        .keys()
        .copied()
        .filter(|t| (t - start_ms) % 100 != 0 || *t < start_ms || *t >= start_ms + n * 100)
        .collect();
    assert!(
        off_grid.is_empty(),
        "timestamps not on the grid start+k*100ms (k in 0..{n}): {:?}",
        &off_grid[..off_grid.len().min(20)]
    );
}
