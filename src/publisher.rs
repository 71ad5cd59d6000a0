//! The MQTT stage: one connection (rumqttc + rustls), QoS 1, a bounded in-flight window,
//! reconnection with jittered backoff, and every PUBACK tied back to its batch.
//!
//! Two tasks. The *link* task owns rumqttc's event loop and only polls it: a poll must never
//! be cancelled half-way (it would drop a publish rumqttc already counts as sent, or a TLS
//! handshake). The *publisher* task owns the bookkeeping and hands publishes to the client.
//! After an error the link waits for the publisher to stop handing over publishes before it
//! clears rumqttc's leftovers and reconnects, so packet ids always match the right message.

use crate::config::Config;
use crate::delivery::Delivery;
use crate::link_error::{self, Class, LinkError};
use crate::spool::{Cmd, Parcel};
use crate::stats::Stats;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the link task reports, in the order rumqttc saw it.
#[derive(Debug)]
enum LinkEvent {
    Connected,
    Sent(u16),
    PubAck(u16),
    Disconnected(LinkError),
    Closed,
}

pub struct PublisherSettings {
    pub topic: String,
    pub window: usize,
    pub shutdown_timeout: Duration,
    pub endpoint: String,
    /// Status messages (online at connect, last will, periodic counters), if enabled.
    pub status: Option<StatusSettings>,
}

pub struct StatusSettings {
    pub topic: String,
    pub interval: Duration,
    pub meta: crate::health::Meta,
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
    let tls = crate::tls::client_config(m)?;
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
    net.set_connection_timeout(m.connect_timeout.0.as_secs().max(1));
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Exponential with "equal jitter": half the delay fixed, half random; never below `min`.
    fn next(&mut self) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.attempt.min(16));
        let d = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        (half + Duration::from_millis(jitter)).max(self.min)
    }
}

/// Polls the event loop for ever; the only owner of it.
async fn link_task(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<LinkEvent>,
    mut resume: mpsc::Receiver<()>,
    mut kick: mpsc::Receiver<Duration>,
    mut backoff: Backoff,
    stop: CancellationToken,
) {
    let min_gap = backoff.min;
    let mut last_connect: Option<Instant> = None;
    let mut connected = false;
    loop {
        if !connected {
            // Never more than one CONNECT per `reconnect_min` (AWS: one per second per client id).
            if let Some(at) = last_connect {
                tokio::select! {
                    _ = tokio::time::sleep_until(at + min_gap) => {}
                    _ = stop.cancelled() => return,
                }
            }
            last_connect = Some(Instant::now());
        }
        let polled = tokio::select! {
            r = eventloop.poll() => Ok(r),
            // The publisher gave up on a PUBACK: drop this connection (a poll cut short is
            // harmless here, the connection goes anyway) and resend on a new one.
            Some(waited) = kick.recv(), if connected => Err(waited),
            _ = stop.cancelled() => return,
        };
        let polled = match polled {
            Ok(Err(ConnectionError::RequestsDone)) => {
                let _ = tx.send(LinkEvent::Closed);
                return;
            }
            Ok(r) => r.map_err(|e| link_error::classify(&e)),
            Err(waited) => {
                eventloop.clean();
                Err(LinkError {
                    class: Class::Network,
                    detail: format!(
                        "no PUBACK for {:.0}s (the broker throttles silently, or the link is dead)",
                        waited.as_secs_f64()
                    ),
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
                if tx.send(LinkEvent::Disconnected(e)).is_err() {
                    return;
                }
                tokio::select! {
                    r = resume.recv() => if r.is_none() { return },
                    _ = stop.cancelled() => return,
                }
                // Publishes handed over since the error are in rumqttc's queues: drop them,
                // the publisher has put them back in its own queue.
                eventloop.clean();
                eventloop.pending.clear();
                // A publish held back on a packet id whose PUBACK never came: rumqttc keeps
                // it across reconnects and would send nothing else, for ever.
                eventloop.state.collision = None;
                let wait = backoff.next();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// Where the publisher gets its work and sends acknowledgements.
pub struct Inputs {
    /// New batches, as they are made.
    pub live: mpsc::Receiver<Parcel>,
    /// The stored backlog, oldest first, coalesced.
    pub backlog: mpsc::Receiver<Parcel>,
    /// Acknowledgements (and wake-ups) back to the spool.
    pub spool: std::sync::mpsc::Sender<Cmd>,
    /// Cancelled when no new data will come (the source ended).
    pub upstream_done: CancellationToken,
    /// The spool's counters, for the status messages.
    pub spool_stats: Arc<crate::spool::SpoolStats>,
}

/// Two token buckets below AWS IoT's per-connection limits (publishes/s and bytes/s).
struct RateLimits {
    messages: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl RateLimits {
    fn new(per_sec: u32, bytes_per_sec: u64) -> Self {
        // A tenth of a second of burst: smooth, and never more than a second's worth
        // right after a reconnect.
        let messages = NonZeroU32::new(per_sec).map(|rate| {
            let burst = NonZeroU32::new((per_sec / 10).max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        let bytes = NonZeroU32::new(bytes_per_sec.min(u64::from(u32::MAX)) as u32).map(|rate| {
            // A whole message must fit the bucket; that is the whole burst.
            let burst = crate::config::AWS_MAX_PAYLOAD as u32 + 1024;
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            messages,
            bytes,
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` if a message of `len` bytes may go now; otherwise how long to wait.
    fn admit(&self, len: usize) -> Result<(), Duration> {
        if let Some(m) = &self.messages
            && let Err(n) = m.check()
        {
            return Err(n.wait_time_from(self.clock.now()));
        }
        if let Some(b) = &self.bytes {
            let n = NonZeroU32::new(len as u32).unwrap_or(NonZeroU32::MIN);
            match b.check_n(n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => return Err(not_until.wait_time_from(self.clock.now())),
                // Larger than the bucket: cannot happen (the bucket holds a full message).
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Publishes everything the spool hands over and reports each acknowledged batch back.
/// Ends when the input is closed and everything is acknowledged; when `stop` fires, after
/// at most `shutdown_timeout`; after the source ended, once no PUBACK has come for
/// `shutdown_timeout`.
pub async fn run(
    config: &Config,
    settings: PublisherSettings,
    inputs: Inputs,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<(), (String, String)> {
    let Inputs {
        mut live,
        mut backlog,
        spool,
        upstream_done,
        spool_stats,
    } = inputs;
    let will = settings.status.as_ref().map(|st| {
        (
            st.topic.as_str(),
            crate::health::offline(&st.meta, "connection lost"),
        )
    });
    let (client, eventloop) = connect_options(config, will)?;
    let control = settings.status.as_ref().map(|st| {
        Arc::new(crate::batch::Control {
            topic: st.topic.clone(),
            retain: false,
        })
    });
    let retained = settings.status.as_ref().map(|st| {
        Arc::new(crate::batch::Control {
            topic: st.topic.clone(),
            retain: true,
        })
    });
    let control_msg = |payload: Vec<u8>, to: &Arc<crate::batch::Control>| crate::batch::Message {
        payload: payload.into(),
        records: 0,
        batches: Vec::new(),
        control: Some(to.clone()),
    };
    let mut status_tick = tokio::time::interval(
        settings
            .status
            .as_ref()
            .map_or(Duration::from_secs(3600), |st| st.interval),
    );
    status_tick.tick().await;
    let m = config
        .mqtt
        .as_ref()
        .ok_or_else(|| ("mqtt".to_string(), "missing".to_string()))?;
    let backoff = Backoff {
        min: m.reconnect_min.0,
        max: m.reconnect_max.0,
        attempt: 0,
    };
    let limits = RateLimits::new(
        config.delivery.max_publish_per_sec,
        config.delivery.max_bytes_per_sec.0,
    );
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    let (resume_tx, resume_rx) = mpsc::channel(1);
    let (kick_tx, kick_rx) = mpsc::channel(1);
    let ack_timeout = m.ack_timeout.0;
    let mut kicked = false;
    let link_stop = CancellationToken::new();
    let link = tokio::spawn(link_task(
        eventloop,
        link_tx,
        resume_rx,
        kick_rx,
        backoff,
        link_stop.clone(),
    ));

    let mut delivery = Delivery::new(settings.window);
    let mut connected = false;
    let mut ever_connected = false;
    let mut outage: Option<(Instant, Class, u32)> = None;
    let (mut live_done, mut backlog_done) = (false, false);
    let mut hard_deadline: Option<Instant> = None;
    let mut last_progress = Instant::now();
    let mut rate_wait: Option<Instant> = None;
    let mut completed = Vec::new();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(500));

    loop {
        Stats::add(&stats.publisher_beats, 1);
        stats
            .connected
            .store(u64::from(connected), std::sync::atomic::Ordering::Relaxed);
        if connected && rate_wait.is_none_or(|w| w <= Instant::now()) {
            rate_wait = None;
            while let Some(len) = delivery.next_len() {
                if let Err(wait) = limits.admit(len) {
                    rate_wait = Some(Instant::now() + wait);
                    break;
                }
                let Some(msg) = delivery.next_to_send() else {
                    break;
                };
                let (topic, retain) = match &msg.control {
                    Some(c) => (c.topic.clone(), c.retain),
                    None => (settings.topic.clone(), false),
                };
                match client.try_publish(topic, QoS::AtLeastOnce, retain, msg.payload) {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!("MQTT client queue full, retrying later: {e}");
                        delivery.unsend_last();
                        break;
                    }
                }
            }
        }
        stats.inflight.store(
            delivery.in_flight() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if live_done && backlog_done && delivery.is_idle() {
            break;
        }
        if hard_deadline.is_none() && stop.is_cancelled() {
            hard_deadline = Some(Instant::now() + settings.shutdown_timeout);
        }
        let deadline = match (hard_deadline, upstream_done.is_cancelled()) {
            (Some(d), _) => Some(d),
            (None, true) => Some(last_progress + settings.shutdown_timeout),
            (None, false) => None,
        };
        let want = delivery.queued() == 0 && hard_deadline.is_none();
        tokio::select! {
            biased;
            ev = link_rx.recv() => match ev {
                Some(LinkEvent::Connected) => {
                    connected = true;
                    if ever_connected {
                        Stats::add(&stats.reconnects, 1);
                    }
                    match outage.take() {
                        Some((since, _, attempts)) => tracing::info!(
                            "connected to {} after {:.1}s and {attempts} failed attempt(s); {} message(s) waiting",
                            settings.endpoint, since.elapsed().as_secs_f64(), delivery.queued()
                        ),
                        None => tracing::info!("connected to {}", settings.endpoint),
                    }
                    ever_connected = true;
                    if let (Some(st), Some(to)) = (&settings.status, &retained) {
                        delivery.enqueue_control(control_msg(crate::health::online(&st.meta), to), true);
                    }
                }
                Some(LinkEvent::Sent(pkid)) => match delivery.on_sent(pkid) {
                    Some(len) => {
                        Stats::add(&stats.messages_published, 1);
                        Stats::add(&stats.bytes_published, len as u64);
                    }
                    None => tracing::warn!("publish with packet id {pkid} matches no message"),
                },
                Some(LinkEvent::PubAck(pkid)) => {
                    Stats::add(&stats.pubacks, 1);
                    stats.last_ack_ms.store(
                        (crate::clock::wall_now_us() / 1000).max(0) as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    last_progress = Instant::now();
                    if delivery.on_puback(pkid, &mut completed) {
                        for a in completed.drain(..) {
                            Stats::add(&stats.batches_acked, 1);
                            Stats::add(&stats.readings_acked, a.records as u64);
                            let _ = spool.send(Cmd::Ack(a.seq));
                        }
                    }
                }
                Some(LinkEvent::Disconnected(err)) => {
                    kicked = false;
                    stats.set_last_error(err.class.name(), err.to_string());
                    let requeued = delivery.in_flight();
                    delivery.on_disconnect();
                    Stats::add(&stats.republished, requeued as u64);
                    report_failure(&mut outage, &err, &settings.endpoint, connected.then_some(requeued));
                    connected = false;
                    let _ = resume_tx.send(()).await;
                }
                Some(LinkEvent::Closed) | None => break,
            },
            p = live.recv(), if want && !live_done => match p {
                Some(p) => delivery.enqueue_many(&p.batches, p.messages),
                None => live_done = true,
            },
            p = backlog.recv(), if want && !backlog_done => match p {
                Some(p) => {
                    delivery.enqueue_many(&p.batches, p.messages);
                    let _ = spool.send(Cmd::Wake);
                }
                None => backlog_done = true,
            },
            _ = sleep_until_opt(rate_wait), if rate_wait.is_some() && connected => {}
            _ = sleep_until_opt(deadline), if deadline.is_some() => {
                if !(delivery.is_idle() && live_done && backlog_done) {
                    tracing::warn!(
                        "stopping with {} batch(es) ({} readings) in flight not acknowledged; the spool keeps them",
                        delivery.open_batches(), delivery.open_records()
                    );
                }
                break;
            }
            _ = stop.cancelled(), if hard_deadline.is_none() => {}
            _ = heartbeat.tick() => {
                if let Some(waited) = delivery.oldest_unacked_wait().filter(|w| *w > ack_timeout)
                    && connected
                    && !kicked
                {
                    kicked = kick_tx.try_send(waited).is_ok();
                }
            }
            _ = status_tick.tick(), if settings.status.is_some() => {
                if let (Some(st), Some(to)) = (&settings.status, &control) {
                    // Only the newest status waits; it queues behind the telemetry.
                    delivery.drop_queued_control();
                    let snap = crate::health::snapshot(&st.meta, &stats, Some(&spool_stats));
                    delivery.enqueue_control(control_msg(snap.to_string().into_bytes(), to), false);
                }
            }
            _ = upstream_done.cancelled(), if !upstream_done.is_cancelled() => {
                last_progress = Instant::now();
            }
        }
    }

    // Say goodbye properly: a retained offline message, then DISCONNECT, so the broker does
    // not fire the last will.
    if connected && let Some(st) = &settings.status {
        let bye = crate::health::offline(&st.meta, "stopped");
        let _ = client.try_publish(st.topic.clone(), QoS::AtLeastOnce, true, bye);
    }
    if connected && client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(ev) = link_rx.recv().await {
                if matches!(ev, LinkEvent::Closed) {
                    break;
                }
            }
        })
        .await;
    }
    link_stop.cancel();
    let _ = link.await;
    Ok(())
}

fn report_failure(
    outage: &mut Option<(Instant, Class, u32)>,
    err: &LinkError,
    endpoint: &str,
    requeued: Option<usize>,
) {
    match outage {
        // Same kind of failure within the same outage: already told.
        Some((_, class, attempts)) if *class == err.class => {
            *attempts += 1;
            tracing::debug!("still cannot reach {endpoint}: {err}");
        }
        _ => {
            let attempts = outage.as_ref().map_or(0, |o| o.2) + 1;
            let since = outage.as_ref().map_or_else(Instant::now, |o| o.0);
            match (err.class, requeued) {
                (Class::Network, Some(n)) => tracing::warn!(
                    "link to {endpoint} lost ({err}); {n} message(s) in flight will be re-sent; reconnecting with backoff"
                ),
                (Class::Network, None) => {
                    tracing::warn!("cannot reach {endpoint} ({err}); retrying with backoff")
                }
                (Class::Tls | Class::Refused, _) => tracing::error!(
                    "cannot connect to {endpoint}: {err}; retrying with backoff, this will not fix itself"
                ),
            }
            *outage = Some((since, err.class, attempts));
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
