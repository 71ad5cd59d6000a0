//! Why a connection to the broker failed, in words a person at the track can act on.

use rumqttc::ConnectionError;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The TLS handshake failed: certificates, keys, names. Retrying alone will not help.
    Tls,
    /// The broker refused the MQTT CONNECT (authorisation, client id).
    Refused,
    /// The network: no route, refused, reset, timed out. Expected on a race track.
    Network,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Tls => "tls",
            Class::Refused => "refused",
            Class::Network => "network",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LinkError {
    pub class: Class,
    pub detail: String,
    pub advice: &'static str,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.detail)?;
        if !self.advice.is_empty() {
            write!(f, ": {}", self.advice)?;
        }
        Ok(())
    }
}

pub fn classify(e: &ConnectionError) -> LinkError {
    if let ConnectionError::ConnectionRefused(code) = e {
        return LinkError {
            class: Class::Refused,
            detail: format!("the broker refused the connection ({code:?})"),
            advice: "check that the device certificate is registered and ACTIVE, attached to the thing, \
                     and that its policy allows iot:Connect for this mqtt.client_id and iot:Publish on mqtt.topic",
        };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return tls_error(tls);
        }
        if let Some(tls) = err.downcast_ref::<rumqttc::TlsError>() {
            match tls {
                rumqttc::TlsError::TLS(t) => return tls_error(t),
                rumqttc::TlsError::Io(_) => {}
                other => {
                    return LinkError {
                        class: Class::Tls,
                        detail: format!("TLS set-up failed: {other}"),
                        advice: "check mqtt.endpoint, mqtt.ca, mqtt.cert and mqtt.key",
                    };
                }
            }
        }
        source = err.source();
    }
    LinkError {
        class: Class::Network,
        detail: format!("connection lost or not possible: {e}"),
        advice: "",
    }
}

fn tls_error(e: &rustls::Error) -> LinkError {
    use rustls::CertificateError as C;
    let (advice, what) = match e {
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => (
            "check mqtt.endpoint: it must be the name in the broker's certificate (AWS: your account's ATS endpoint)",
            "the broker's certificate does not match mqtt.endpoint",
        ),
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => (
            "check the system clock (an ECU without a battery-backed clock boots in the past) and the broker's certificate dates",
            "the broker's certificate is not valid at this time",
        ),
        rustls::Error::InvalidCertificate(_) => (
            "check mqtt.ca: it must be the CA that signed the broker's certificate (AWS IoT: AmazonRootCA1.pem), and mqtt.endpoint",
            "the broker's certificate is not trusted",
        ),
        rustls::Error::AlertReceived(_) => (
            "check mqtt.cert and mqtt.key: the broker did not accept this client certificate (AWS IoT: registered, ACTIVE, signed by a registered CA)",
            "the broker rejected the TLS handshake",
        ),
        _ => (
            "check mqtt.ca, mqtt.cert, mqtt.key and mqtt.endpoint",
            "the TLS handshake failed",
        ),
    };
    LinkError {
        class: Class::Tls,
        detail: format!("TLS: {what} ({e})"),
        advice,
    }
}
