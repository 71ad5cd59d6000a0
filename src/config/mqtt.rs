//! `[mqtt]`: the broker, the credentials, the telemetry topic and the connection's timing.

use super::Config;
use crate::units::Dur;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// AWS IoT Core's cap on unacknowledged QoS 1 publishes per connection.
pub const AWS_MAX_INFLIGHT: u16 = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    pub endpoint: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default = "default_topic")]
    pub topic: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub alpn: Vec<String>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur,
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: Dur,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: Dur,
    /// A publish without PUBACK for this long: the connection is dropped and everything
    /// unacknowledged is sent again on a new one (AWS throttles by withholding PUBACKs).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Dur,
}

fn default_port() -> u16 {
    8883
}
fn default_topic() -> String {
    "redline/telemetry/{vehicle_id}".into()
}
fn default_keep_alive() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_inflight() -> u16 {
    20
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_reconnect_min() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_ack_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_reconnect_max() -> Dur {
    Dur(Duration::from_secs(60))
}

impl Config {
    /// `[mqtt]`: the client id and topic are checked as filled in for this vehicle.
    pub(super) fn validate_mqtt(&self, m: &Mqtt) -> Result<(), (String, String)> {
        let e = |key: &str, msg: String| Err((key.to_string(), msg));
        if m.endpoint.is_empty() {
            return e("mqtt.endpoint", "must not be empty".into());
        }
        let client_id = self.client_id();
        if client_id.is_empty() || client_id.len() > 128 {
            return e(
                "mqtt.client_id",
                format!(
                    "expected 1 to 128 bytes (AWS IoT's limit), got {}",
                    client_id.len()
                ),
            );
        }
        if let Err(msg) = telemetry_topic(&m.topic, &self.vehicle.id) {
            return e("mqtt.topic", msg);
        }
        let ka = m.keep_alive.0;
        if ka < Duration::from_secs(5) || ka > Duration::from_secs(1200) {
            return e(
                "mqtt.keep_alive",
                format!(
                    "expected 5s to 1200s (AWS IoT uses 30s to 1200s), got {}",
                    humantime::format_duration(ka)
                ),
            );
        }
        if !(1..=AWS_MAX_INFLIGHT).contains(&m.max_inflight) {
            return e(
                "mqtt.max_inflight",
                format!("expected 1 to {AWS_MAX_INFLIGHT}, got {}", m.max_inflight),
            );
        }
        if m.connect_timeout.0 < Duration::from_secs(1) {
            return e("mqtt.connect_timeout", "expected at least 1s".into());
        }
        if m.reconnect_min.0 < Duration::from_secs(1) {
            return e(
                "mqtt.reconnect_min",
                "expected at least 1s (AWS IoT allows one CONNECT per second per client id)".into(),
            );
        }
        if m.ack_timeout.0 < Duration::from_secs(1) {
            return e("mqtt.ack_timeout", "expected at least 1s".into());
        }
        if m.reconnect_max.0 < m.reconnect_min.0 {
            return e(
                "mqtt.reconnect_max",
                "must not be below mqtt.reconnect_min".into(),
            );
        }
        Ok(())
    }
}

/// Fills `{vehicle_id}` into a topic template; any other placeholder is an error.
pub fn expand_topic(template: &str, vehicle_id: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + vehicle_id.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in {template:?}"))?;
        match &after[..close] {
            "vehicle_id" => out.push_str(vehicle_id),
            other => {
                return Err(format!(
                    "unknown placeholder `{{{other}}}` in {template:?}: the only placeholder is {{vehicle_id}}"
                ));
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    if out.is_empty() || out.contains(['+', '#']) || out.starts_with('$') {
        return Err(format!(
            "{template:?} is not a topic one can publish to (empty, a wildcard, or reserved `$`)"
        ));
    }
    Ok(out)
}

/// AWS IoT Basic Ingest: publishing to `$aws/rules/RULE/…` hands the message straight to
/// the rule, without the message broker (and its cost).
pub const BASIC_INGEST_PREFIX: &str = "$aws/rules/";

/// The telemetry topic: a normal topic, or a Basic Ingest one
/// (`$aws/rules/RULE_NAME/redline/telemetry/{vehicle_id}`). Either must fit AWS IoT's
/// limits: at most 256 bytes and 7 slashes (after the Basic Ingest prefix and rule name).
pub fn telemetry_topic(template: &str, vehicle_id: &str) -> Result<String, String> {
    let (prefix, rest) = match template.strip_prefix(BASIC_INGEST_PREFIX) {
        Some(after) => {
            let (rule, rest) = after.split_once('/').ok_or_else(|| {
                format!("{template:?}: Basic Ingest needs `$aws/rules/RULE_NAME/TOPIC`")
            })?;
            if rule.is_empty() || !rule.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "{template:?}: the rule name {rule:?} may hold only letters, digits and `_`"
                ));
            }
            (
                &template[..BASIC_INGEST_PREFIX.len() + rule.len() + 1],
                rest,
            )
        }
        None => ("", template),
    };
    let topic = expand_topic(rest, vehicle_id)?;
    let slashes = topic.matches('/').count();
    if slashes > 7 {
        return Err(format!(
            "{template:?} has {slashes} `/` (AWS IoT allows 7{})",
            if prefix.is_empty() {
                ""
            } else {
                " after the Basic Ingest prefix"
            }
        ));
    }
    let full = format!("{prefix}{topic}");
    if full.len() > 256 {
        return Err(format!(
            "{template:?} is {} bytes once filled in (AWS IoT allows 256)",
            full.len()
        ));
    }
    Ok(full)
}
