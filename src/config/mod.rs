//! The TOML configuration: its layout, its defaults, and validation that names the key.

mod batch;
mod clock;
mod delivery;
mod fields;
mod mqtt;
mod sampling;
mod source;
mod spool;
mod status;
mod vehicle;

pub use batch::{AWS_MAX_PAYLOAD, Batch, MAX_RECORDS_PER_MESSAGE, PayloadMode};
pub use clock::{Clock, GpsDateTime, GpsSignals, Trust};
pub use delivery::{DEFAULT_MEMORY_BYTES, Delivery, Order};
pub use fields::{FieldSpec, FieldType, default_fields};
pub use mqtt::{AWS_MAX_INFLIGHT, BASIC_INGEST_PREFIX, Mqtt, expand_topic, telemetry_topic};
pub use sampling::Sampling;
pub use source::{
    Convert, LineFormatKind, Parity, SignalBinding, Source, SourceKind, split_signal,
};
pub use spool::{Spool, SyncInterval};
pub use status::{DEFAULT_STATUS_FILE, Status};
pub use vehicle::Vehicle;
use vehicle::default_session;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vehicle: Vehicle,
    #[serde(default)]
    pub sampling: Sampling,
    #[serde(default = "default_fields")]
    pub fields: IndexMap<String, FieldSpec>,
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub batch: Batch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<Mqtt>,
    #[serde(default)]
    pub delivery: Delivery,
    /// `None`: not in the file. `run` then uses the defaults; `simulate` a temporary spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool: Option<Spool>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub clock: Clock,
}

/// A configuration error: which file, which key, what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "configuration error in {}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "configuration error in {}: key `{}`: {}",
                self.file, self.key, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The built-in configuration of `simulate` without `--config`: simulator, stdout.
    pub fn bench_default() -> Self {
        Self {
            vehicle: Vehicle {
                id: "GT3-RACER-01".into(),
                session_id: default_session(),
            },
            sampling: Sampling::default(),
            fields: default_fields(),
            source: Source::default(),
            batch: Batch::default(),
            mqtt: None,
            delivery: Delivery::default(),
            spool: None,
            status: Status::default(),
            clock: Clock::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse_in(&text, &file, base)?;
        config.use_credentials();
        Ok(config)
    }

    /// Under systemd with `LoadCredential=mqtt.key:...`, the private key comes from the
    /// credentials directory (readable by the service alone) instead of `mqtt.key`.
    fn use_credentials(&mut self) {
        let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
            return;
        };
        let key = Path::new(&dir).join("mqtt.key");
        if let Some(m) = &mut self.mqtt
            && key.is_file()
        {
            m.key = key;
        }
    }

    /// Parses and validates `text`; `file` is used in error messages only.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, file, Path::new("."))
    }

    /// As `parse`, with relative file paths in the config taken from `base` (the config
    /// file's directory).
    pub fn parse_in(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let err = |key: String, message: String| ConfigError {
            file: file.to_string(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            err(
                String::new(),
                format!("not valid TOML: {}", e.to_string().trim()),
            )
        })?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.message().to_string();
            // serde reports an unknown key at its parent's path; name the key itself.
            let key = match unknown_field_name(&msg) {
                Some(name) if path == "." => name,
                Some(name) if path.ends_with(&name) => path,
                Some(name) => format!("{path}.{name}"),
                None if path == "." => String::new(),
                None => path,
            };
            let line = inner
                .span()
                .map(|s| format!(" (line {})", line_of(text, s.start)))
                .unwrap_or_default();
            err(key, format!("{msg}{line}"))
        })?;
        if let Some(m) = &mut config.mqtt {
            for p in [&mut m.ca, &mut m.cert, &mut m.key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if let Some(sp) = &mut config.spool
            && sp.dir.is_relative()
        {
            sp.dir = base.join(&sp.dir);
        }
        if let Some(dev) = &mut config.source.device
            && dev.is_relative()
        {
            *dev = base.join(&*dev);
        }
        if let Some(dbc) = &mut config.source.dbc
            && dbc.is_relative()
        {
            *dbc = base.join(&*dbc);
        }
        if config.status.file.is_relative() && !config.status.file.as_os_str().is_empty() {
            config.status.file = base.join(&config.status.file);
        }
        config
            .validate()
            .map_err(|(key, message)| err(key, message))?;
        Ok(config)
    }

    /// Each section checks its own keys; the first error is reported. The order of the calls
    /// is the order errors have always been reported in.
    fn validate(&self) -> Result<(), (String, String)> {
        self.vehicle.validate()?;
        self.sampling.validate()?;
        fields::validate_present(&self.fields)?;
        self.validate_source()?;
        fields::validate(&self.fields)?;
        self.batch.validate()?;
        if let Some(m) = &self.mqtt {
            self.validate_mqtt(m)?;
        }
        self.status.validate_messages(&self.vehicle.id)?;
        self.clock.validate()?;
        self.clock.validate_gps(self.source.kind)?;
        self.status.validate_file()?;
        self.delivery.validate(&self.batch)?;
        if let Some(sp) = &self.spool {
            sp.validate()?;
        }
        Ok(())
    }

    /// A warning when the private key can be read by anyone but its owner (and group): it
    /// identifies the car to AWS.
    pub fn key_permission_warning(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let key = &self.mqtt.as_ref()?.key;
        let mode = std::fs::metadata(key).ok()?.permissions().mode();
        (mode & 0o077 != 0).then(|| {
            format!(
                "the private key {} is readable by other users (mode {:o}): chmod 0600 (the systemd unit hands it to the service with LoadCredential=)",
                key.display(),
                mode & 0o777
            )
        })
    }

    pub fn client_id(&self) -> String {
        self.mqtt
            .as_ref()
            .and_then(|m| m.client_id.clone())
            .unwrap_or_else(|| self.vehicle.id.clone())
    }

    /// The status topic with its placeholders filled in, if status messages are on.
    pub fn status_topic(&self) -> Option<String> {
        if !self.status.enabled {
            return None;
        }
        expand_topic(&self.status.topic, &self.vehicle.id).ok()
    }

    /// The topic with its placeholders filled in. Valid after `validate`.
    pub fn topic(&self) -> Option<String> {
        let m = self.mqtt.as_ref()?;
        telemetry_topic(&m.topic, &self.vehicle.id).ok()
    }

    pub fn field_names(&self) -> Vec<String> {
        self.fields.keys().cloned().collect()
    }

    /// The effective configuration as TOML, as `check-config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml")
    }

    #[test]
    fn minimal_config_has_documented_defaults() {
        let c = parse("[vehicle]\nid = \"GT3\"\n").expect("valid");
        assert_eq!(c.sampling.rate_hz, 10);
        assert_eq!(c.batch.max_records, 10);
        assert_eq!(c.batch.max_bytes.0, 131_072);
        assert_eq!(
            c.field_names(),
            [
                "brake_disc_temp_fl",
                "brake_disc_temp_fr",
                "engine_rpm",
                "engine_oil_temp"
            ]
        );
        assert_eq!(c.vehicle.session_id, "auto");
    }

    #[test]
    fn gps_time_bindings_are_checked() {
        let base = "[vehicle]\nid = \"x\"\n";
        let c = parse(&format!("{base}[clock]\ngps = \"GpsTime.UtcTime\"\n")).expect("valid");
        assert_eq!(
            c.clock.gps,
            Some(GpsSignals::UtcSeconds("GpsTime.UtcTime".into()))
        );
        let c = parse(&format!(
            "{base}[clock]\ngps_valid = \"GpsStatus.Fix\"\n[clock.gps]\nyear = \"D.Y\"\nmonth = \"D.M\"\nday = \"D.D\"\nhour = \"T.H\"\nminute = \"T.M\"\nsecond = \"T.S\"\n"
        ))
        .expect("valid date/time set");
        let parts = c
            .clock
            .gps
            .as_ref()
            .map(GpsSignals::parts)
            .unwrap_or_default();
        assert_eq!(parts.len(), 6);
        assert_eq!(parts[5].0, "clock.gps.second");
        for (extra, key) in [
            ("[clock]\ngps = \"UtcTime\"\n", "clock.gps"),
            ("[clock]\ngps_valid = \"G.Fix\"\n", "clock.gps_valid"),
            (
                "[clock]\ngps = \"G.T\"\ngps_valid = \"Fix\"\n",
                "clock.gps_valid",
            ),
            (
                "[clock.gps]\nyear = \"D.Y\"\nmonth = \"D.M\"\nday = \"D.D\"\nhour = \"T.H\"\nminute = \"T.M\"\nsecond = \"S\"\n",
                "clock.gps.second",
            ),
            (
                "[source]\nkind = \"serial\"\ndevice = \"/dev/ttyUSB0\"\nformat = \"kv\"\n[clock]\ngps = \"G.T\"\n",
                "clock.gps",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[vehicle]\nid = \"x\"\n[batch]\nfoo = 1\n").unwrap_err();
        assert_eq!(e.key, "batch.foo");
        assert_eq!(e.file, "test.toml");
        let e = parse("[vehicle]\nid = \"x\"\n[nope]\n").unwrap_err();
        assert_eq!(e.key, "nope");
    }

    #[test]
    fn type_errors_name_the_key_and_line() {
        let e = parse("[vehicle]\nid = \"x\"\n[sampling]\nrate_hz = \"ten\"\n").unwrap_err();
        assert_eq!(e.key, "sampling.rate_hz");
        assert!(e.message.contains("line 4"), "{e}");
        let e = parse("[vehicle]\nid = \"x\"\n[batch]\nmax_age = \"soon\"\n").unwrap_err();
        assert_eq!(e.key, "batch.max_age");
        let e =
            parse("[vehicle]\nid = \"x\"\n[fields]\nrpm = { type = \"bool\", min = 0, max = 1 }\n")
                .unwrap_err();
        assert_eq!(e.key, "fields.rpm.type");
    }

    #[test]
    fn limits_are_enforced() {
        let base = "[vehicle]\nid = \"x\"\n";
        for (extra, key) in [
            ("[batch]\nmax_bytes = \"200KiB\"\n", "batch.max_bytes"),
            ("[batch]\nmax_records = 501\n", "batch.max_records"),
            ("[batch]\nmax_records = 0\n", "batch.max_records"),
            ("[sampling]\nrate_hz = 0\n", "sampling.rate_hz"),
            (
                "[fields]\nEngineRPM = { type = \"int\", min = 0, max = 1 }\n",
                "fields.EngineRPM",
            ),
            (
                "[fields]\nx = { type = \"int\", min = 5, max = 1 }\n",
                "fields.x",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}");
        }
    }

    #[test]
    fn memory_bytes_default_and_bound() {
        let c = parse("[vehicle]\nid = \"GT3\"\n").expect("valid");
        assert_eq!(c.delivery.memory_bytes.0, 4 << 20);
        assert_eq!(c.delivery.memory_batches, 3600);
        let c = parse("[vehicle]\nid = \"GT3\"\n[delivery]\nmemory_bytes = \"256KiB\"\n")
            .expect("twice batch.max_bytes is enough");
        assert_eq!(c.delivery.memory_bytes.0, 256 << 10);
        let e =
            parse("[vehicle]\nid = \"GT3\"\n[delivery]\nmemory_bytes = \"200KiB\"\n").unwrap_err();
        assert_eq!(e.key, "delivery.memory_bytes");
        assert!(e.message.contains("256KiB"), "{}", e.message);
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = parse("[vehicle\nid = 1").unwrap_err();
        assert!(e.to_string().contains("test.toml"));
        assert!(e.message.contains("line 1"), "{}", e.message);
    }

    #[test]
    fn topic_placeholders() {
        assert_eq!(
            expand_topic("redline/telemetry/{vehicle_id}", "GT3").as_deref(),
            Ok("redline/telemetry/GT3")
        );
        assert!(
            expand_topic("x/{nope}", "GT3")
                .unwrap_err()
                .contains("{nope}")
        );
        assert!(expand_topic("x/{vehicle_id", "GT3").is_err());
        assert!(expand_topic("x/+", "GT3").is_err());
        assert_eq!(
            telemetry_topic(
                "$aws/rules/redline_telemetry/redline/telemetry/{vehicle_id}",
                "GT3"
            )
            .as_deref(),
            Ok("$aws/rules/redline_telemetry/redline/telemetry/GT3")
        );
        assert!(telemetry_topic("$aws/rules/bad-name/x", "GT3").is_err());
        assert!(telemetry_topic("$aws/rules/rule", "GT3").is_err());
        assert!(
            telemetry_topic("$aws/things/x", "GT3").is_err(),
            "other $ topics stay reserved"
        );
        assert!(
            telemetry_topic("a/b/c/d/e/f/g/h/i", "GT3").is_err(),
            "8 slashes"
        );
        assert!(
            telemetry_topic("$aws/rules/r/a/b/c/d/e/f/g/h", "GT3").is_ok(),
            "7 after the prefix"
        );
        assert!(telemetry_topic(&"x".repeat(257), "GT3").is_err());
    }
}
