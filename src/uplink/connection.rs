//! The connection task: the only owner of rumqttc's event loop. It polls, reports what
//! happened in the order rumqttc saw it, and reconnects with backoff. It moves bytes and
//! decides nothing about what to send.
//!
//! A poll of a live connection is never cancelled half-way (it would drop a publish
//! rumqttc already counts as sent). Two exceptions are safe: the connect itself (the event
//! loop has no network yet, the next poll starts over), which is how `mqtt.connect_timeout`
//! is applied; and a kick from the publisher, which drops the connection anyway.
//!
//! rumqttc applies its *connection* timeout to every socket flush too. The event loop's
//! timeout is therefore set to cover `mqtt.ack_timeout`: on a thin link a flush may wait
//! for the kernel's buffer while the link still moves, and only a link that moves nothing
//! for that long is dead.

use super::link_error::{self, Class, LinkError};
use crate::config::Config;
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest wait between attempts while failures are the network's: outages on a
/// circuit last a lap, and the link must be used the moment it is back.
pub const NETWORK_BACKOFF_CAP: Duration = Duration::from_secs(4);

/// What the connection task reports, in the order rumqttc saw it.
#[derive(Debug)]
pub enum LinkEvent {
    Connected,
    Sent(u16),
    PubAck(u16),
    Disconnected(LinkError),
    Closed,
}

/// Builds the client and its event loop from the configuration.
pub fn connect_options(
    config: &Config,
    will: Option<(&str, Vec<u8>)>,
) -> Result<(AsyncClient, EventLoop), (String, String)> {
    let m = config.mqtt.as_ref().ok_or_else(|| {
        (
            "mqtt".to_string(),
            "the [mqtt] table is required to publish (or use --stdout)".to_string(),
        )
    })?;
    let tls = crate::uplink::tls::client_config(m)?;
    let mut opts = MqttOptions::new(config.client_id(), m.endpoint.clone(), m.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    opts.set_keep_alive(m.keep_alive.0);
    // AWS IoT keeps no session for clean sessions; we re-send from our own outbox anyway.
    opts.set_clean_session(true);
    // AWS IoT accepts 128 KiB payloads; leave room for the topic and the header.
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    opts.set_inflight(m.max_inflight);
    if let Some((topic, payload)) = will {
        opts.set_last_will(rumqttc::LastWill::new(
            topic,
            payload,
            QoS::AtLeastOnce,
            true,
        ));
    }
    opts.set_request_channel_capacity(usize::from(m.max_inflight) * 2 + 16);
    let (client, mut eventloop) = AsyncClient::new(opts, usize::from(m.max_inflight) * 2 + 16);
    let mut net = eventloop.network_options();
    let flush = m.ack_timeout.0.max(m.connect_timeout.0);
    net.set_connection_timeout(flush.as_secs().max(1));
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    pub attempt: u32,
}

impl Backoff {
    /// Exponential with "equal jitter" (half the delay fixed, half random), never below
    /// `min`; capped at `NETWORK_BACKOFF_CAP` for network failures, which heal by
    /// themselves, and at `max` for refusals, which do not.
    pub fn next(&mut self, class: Class) -> Duration {
        let cap = match class {
            Class::Network => self.max.min(NETWORK_BACKOFF_CAP),
            Class::Tls | Class::Refused => self.max,
        };
        let exp = self.min.saturating_mul(1u32 << self.attempt.min(16));
        let d = exp.min(cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        (half + Duration::from_millis(jitter)).max(self.min)
    }
}

/// How the publisher steers the connection task.
pub struct Control {
    /// After a `Disconnected`, the publisher has stopped handing over publishes.
    pub resume: mpsc::Receiver<()>,
    /// Drop the connection now (an overdue PUBACK), with the reason.
    pub kick: mpsc::Receiver<String>,
    /// The network came back (a route or address appeared): skip the rest of the backoff.
    pub network_up: Arc<Notify>,
    pub connect_timeout: Duration,
    pub stop: CancellationToken,
}

/// Polls the event loop for ever; the only owner of it.
pub async fn run(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<LinkEvent>,
    mut ctl: Control,
    mut backoff: Backoff,
) {
    // Never more than one CONNECT per `reconnect_min` (AWS: one per second per client id).
    let min_gap = backoff.min;
    let mut last_connect: Option<Instant> = None;
    let mut connected = false;
    loop {
        if !connected {
            if let Some(at) = last_connect {
                tokio::select! {
                    _ = tokio::time::sleep_until(at + min_gap) => {}
                    _ = ctl.stop.cancelled() => return,
                }
            }
            last_connect = Some(Instant::now());
        }
        let polled = if connected {
            tokio::select! {
                r = eventloop.poll() => Ok(r),
                Some(why) = ctl.kick.recv() => Err(why),
                _ = ctl.stop.cancelled() => return,
            }
        } else {
            tokio::select! {
                r = tokio::time::timeout(ctl.connect_timeout, eventloop.poll()) => match r {
                    Ok(r) => Ok(r),
                    Err(_) => Err(format!(
                        "no CONNACK within mqtt.connect_timeout ({}s)",
                        ctl.connect_timeout.as_secs()
                    )),
                },
                _ = ctl.stop.cancelled() => return,
            }
        };
        let polled = match polled {
            Ok(Err(ConnectionError::RequestsDone)) => {
                let _ = tx.send(LinkEvent::Closed);
                return;
            }
            Ok(r) => r.map_err(|e| link_error::classify(&e)),
            Err(why) => {
                eventloop.clean();
                Err(LinkError {
                    class: Class::Network,
                    detail: why,
                    advice: "",
                })
            }
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff.attempt = 0;
                LinkEvent::Connected
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => LinkEvent::PubAck(ack.pkid),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => LinkEvent::Sent(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = tx.send(LinkEvent::Closed);
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                connected = false;
                // Acks read just before the error are real; other leftovers are dropped.
                for ev in eventloop.state.events.drain(..) {
                    if let Event::Incoming(Packet::PubAck(ack)) = ev {
                        let _ = tx.send(LinkEvent::PubAck(ack.pkid));
                    }
                }
                let class = e.class;
                if tx.send(LinkEvent::Disconnected(e)).is_err() {
                    return;
                }
                tokio::select! {
                    r = ctl.resume.recv() => if r.is_none() { return },
                    _ = ctl.stop.cancelled() => return,
                }
                // Publishes handed over since the error are in rumqttc's queues: drop them,
                // the publisher has put them back in its own queue.
                eventloop.clean();
                eventloop.pending.clear();
                // A publish held back on a packet id whose PUBACK never came: rumqttc keeps
                // it across reconnects and would send nothing else, for ever.
                eventloop.state.collision = None;
                let wait = backoff.next(class);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctl.network_up.notified() => {
                        tracing::info!("network changed: reconnecting without waiting out the backoff");
                    }
                    _ = ctl.stop.cancelled() => return,
                }
                continue;
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_failures_back_off_a_few_seconds_refusals_to_the_maximum() {
        let mut b = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempt: 0,
        };
        let net: Vec<Duration> = (0..20).map(|_| b.next(Class::Network)).collect();
        assert!(net.iter().all(|d| *d >= Duration::from_secs(1)));
        assert!(net.iter().all(|d| *d <= NETWORK_BACKOFF_CAP), "{net:?}");
        let mut b = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempt: 0,
        };
        let tls: Vec<Duration> = (0..20).map(|_| b.next(Class::Tls)).collect();
        assert!(
            tls[10..].iter().all(|d| *d >= Duration::from_secs(30)),
            "{tls:?}"
        );
        assert!(tls.iter().all(|d| *d <= Duration::from_secs(60)));
    }
}
