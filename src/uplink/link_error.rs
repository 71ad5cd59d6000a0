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
    if let Some(tls) = find_tls(e) {
        return tls;
    }
    LinkError {
        class: Class::Network,
        detail: format!("connection lost or not possible: {e}"),
        advice: "",
    }
}

/// Looks through the error chain for a TLS failure. `io::Error::source` skips the error it
/// wraps, so wrapped errors are opened with `get_ref` as well.
fn find_tls(e: &(dyn std::error::Error + 'static)) -> Option<LinkError> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls_error(tls));
    }
    if let Some(rumqttc::TlsError::TLS(t)) = e.downcast_ref::<rumqttc::TlsError>() {
        return Some(tls_error(t));
    }
    if let Some(
        other @ (rumqttc::TlsError::NoValidCertInChain
        | rumqttc::TlsError::NoValidClientCertInChain
        | rumqttc::TlsError::NoValidKeyInChain
        | rumqttc::TlsError::DNSName(_)),
    ) = e.downcast_ref::<rumqttc::TlsError>()
    {
        return Some(LinkError {
            class: Class::Tls,
            detail: format!("TLS set-up failed: {other}"),
            advice: "check mqtt.endpoint, mqtt.ca, mqtt.cert and mqtt.key",
        });
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        && let Some(found) = find_tls(inner)
    {
        return Some(found);
    }
    e.source().and_then(find_tls)
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
