//! Checks a configuration against the stages that will use it, before a start: the DBC
//! and its bindings (through the CAN decoder), the certificates and the key (through the
//! TLS setup). Here and not in `config`, so that `config` parses and validates and imports
//! no stage.

use crate::config::{Config, ConfigError, SourceKind};

/// The files the configuration names (DBC, certificates, key): readable and usable.
/// Separate from parsing so a config can be checked before they are installed.
pub fn files(config: &Config, file: &str) -> Result<(), ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        file: file.to_string(),
        key: key.to_string(),
        message,
    };
    dbc(config, file)?;
    let Some(m) = &config.mqtt else { return Ok(()) };
    for (key, path) in [
        ("mqtt.ca", &m.ca),
        ("mqtt.cert", &m.cert),
        ("mqtt.key", &m.key),
    ] {
        if let Err(e) = std::fs::File::open(path) {
            return Err(err(key, format!("cannot read {}: {e}", path.display())));
        }
    }
    crate::uplink::tls::client_config(m)
        .map(|_| ())
        .map_err(|(key, msg)| err(&key, msg))
}

/// The DBC of a CAN source and the bindings to it, as a start would (`check-config
/// --no-files` too: the DBC is part of the configuration, not a secret installed later): a
/// defect in a bound message is an error, the others are logged as warnings.
pub fn dbc(config: &Config, file: &str) -> Result<(), ConfigError> {
    if config.source.kind != SourceKind::Can {
        return Ok(());
    }
    crate::source::can::Decoding::from_config(config)
        .map(|_| ())
        .map_err(|(key, message)| ConfigError {
            file: file.to_string(),
            key,
            message,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cert_names_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").expect("write");
        let text = format!(
            "[vehicle]\nid = \"x\"\n[mqtt]\nendpoint = \"h\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            ca,
            dir.path().join("nope.pem"),
            ca
        );
        let config = Config::parse(&text, "test.toml").expect("valid apart from its files");
        assert_eq!(files(&config, "test.toml").unwrap_err().key, "mqtt.cert");
    }
}
