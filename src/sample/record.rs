//! A reading, and its JSON record in the documented schema, byte for byte.

use crate::config::{Config, FieldType};
use crate::sample::signal::Micros;

/// One sample of every configured field at one tick of the grid. `None` is JSON `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub at: Micros,
    pub values: Vec<Option<f64>>,
}

impl Reading {
    /// Epoch milliseconds of the sampling instant (the record's `timestamp`).
    pub fn timestamp_ms(&self) -> i64 {
        self.at.div_euclid(1000)
    }
}

/// Writes records: `{"vehicle_id":..,"timestamp":..,"session_id":..,<fields>}`.
#[derive(Debug, Clone)]
pub struct RecordEncoder {
    head: Vec<u8>,
    session: Vec<u8>,
    fields: Vec<(Vec<u8>, FieldType)>,
}

impl RecordEncoder {
    pub fn new(config: &Config, session_id: &str) -> Self {
        let head = format!(
            "{{\"vehicle_id\":{},\"timestamp\":",
            json_str(&config.vehicle.id)
        );
        let session = format!(",\"session_id\":{}", json_str(session_id));
        let fields = config
            .fields
            .iter()
            .map(|(name, spec)| (format!(",{}:", json_str(name)).into_bytes(), spec.ty))
            .collect();
        Self {
            head: head.into_bytes(),
            session: session.into_bytes(),
            fields,
        }
    }

    /// Appends the record of `reading` to `out`.
    pub fn encode(&self, reading: &Reading, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(
            itoa::Buffer::new()
                .format(reading.timestamp_ms())
                .as_bytes(),
        );
        out.extend_from_slice(&self.session);
        for ((key, ty), value) in self.fields.iter().zip(&reading.values) {
            out.extend_from_slice(key);
            match (value, ty) {
                (Some(v), FieldType::Int) if v.is_finite() => {
                    out.extend_from_slice(itoa::Buffer::new().format(v.round() as i64).as_bytes());
                }
                (Some(v), FieldType::Float) if v.is_finite() => {
                    out.extend_from_slice(ryu::Buffer::new().format_finite(*v).as_bytes());
                }
                _ => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_example_record_byte_for_byte() {
        let mut config = Config::bench_default();
        config.vehicle.id = "GT3-RACER-01".into();
        let enc = RecordEncoder::new(&config, "abc-123-def");
        let reading = Reading {
            at: 1_705_267_200_000_000,
            values: vec![Some(652.3), Some(648.1), Some(7850.0), Some(105.2)],
        };
        let mut out = Vec::new();
        enc.encode(&reading, &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#"{"vehicle_id":"GT3-RACER-01","timestamp":1705267200000,"session_id":"abc-123-def","brake_disc_temp_fl":652.3,"brake_disc_temp_fr":648.1,"engine_rpm":7850,"engine_oil_temp":105.2}"#
        );
    }

    #[test]
    fn nulls_and_escaping() {
        let mut config = Config::bench_default();
        config.vehicle.id = "car \"7\"".into();
        let enc = RecordEncoder::new(&config, "s");
        let reading = Reading {
            at: 1_999,
            values: vec![None, Some(f64::NAN), Some(7850.4), Some(100.0)],
        };
        let mut out = Vec::new();
        enc.encode(&reading, &mut out);
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            r#"{"vehicle_id":"car \"7\"","timestamp":1,"session_id":"s","brake_disc_temp_fl":null,"brake_disc_temp_fr":null,"engine_rpm":7850,"engine_oil_temp":100.0}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert!(v["engine_rpm"].is_i64());
    }
}
