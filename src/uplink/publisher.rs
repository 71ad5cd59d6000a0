//! The MQTT stage: wires the scheduler (what goes next) to the connection task (which moves
//! the bytes), applies AWS's rate limits, keeps the status messages coming, and reports
//! every acknowledged batch back to the spool.
//!
//! After a connection error the connection task waits for this task to stop handing over
//! publishes before it clears rumqttc's leftovers and reconnects, so packet ids always
//! match the right message.

use super::connection::{self, Backoff, LinkEvent};
use super::link_error::{Class, LinkError};
use super::rate_limit::RateLimits;
use super::scheduler::{ControlMsg, Figures, Overdue, Scheduler};
use crate::config::Config;
use crate::ops::stats::Stats;
use crate::sample::batch::Control;
use crate::spool::{Cmd, Parcel};
use rumqttc::{AsyncClient, QoS};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use super::connection::connect_options;

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
    pub meta: crate::ops::health::Meta,
}

/// Where the publisher gets its work and sends acknowledgements.
pub struct Inputs {
    /// New batches, as they are made.
    pub live: mpsc::Receiver<Parcel>,
    /// The stored backlog, oldest first.
    pub backlog: mpsc::Receiver<Parcel>,
    /// Acknowledgements (and wake-ups) back to the spool.
    pub spool: std::sync::mpsc::Sender<Cmd>,
    /// Cancelled when no new data will come (the source ended).
    pub upstream_done: CancellationToken,
    /// The spool's counters, for the status messages.
    pub spool_stats: Arc<crate::spool::SpoolStats>,
}

/// Live batches the publisher holds before it leaves them to the spool's backlog.
const LIVE_HELD: usize = 8;

/// The status topic's two kinds of message: periodic (not retained) and online/offline
/// (retained).
struct StatusTopics {
    settings: StatusSettings,
    periodic: Arc<Control>,
    retained: Arc<Control>,
}

impl StatusTopics {
    fn new(settings: StatusSettings) -> Self {
        let to = |retain| {
            Arc::new(Control {
                topic: settings.topic.clone(),
                retain,
            })
        };
        Self {
            periodic: to(false),
            retained: to(true),
            settings,
        }
    }

    fn online(&self) -> ControlMsg {
        ControlMsg {
            payload: crate::ops::health::online(&self.settings.meta).into(),
            to: self.retained.clone(),
        }
    }

    fn snapshot(&self, stats: &Stats, spool: &crate::spool::SpoolStats) -> ControlMsg {
        let snap = crate::ops::health::snapshot(&self.settings.meta, stats, Some(spool));
        ControlMsg {
            payload: snap.to_string().into_bytes().into(),
            to: self.periodic.clone(),
        }
    }
}

/// Publishes everything the spool hands over and reports each acknowledged batch back.
/// Ends when the input is closed and everything is acknowledged; when `stop` fires, once
/// the last live batch is acknowledged or after at most `shutdown_timeout`; after the
/// source ended, once no PUBACK has come for `shutdown_timeout`.
pub async fn run(
    config: &Config,
    settings: PublisherSettings,
    inputs: Inputs,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<(), (String, String)> {
    let m = config
        .mqtt
        .as_ref()
        .ok_or_else(|| ("mqtt".to_string(), "missing".to_string()))?;
    let status = settings.status.map(StatusTopics::new);
    let will = status.as_ref().map(|st| {
        (
            st.settings.topic.as_str(),
            crate::ops::health::offline(&st.settings.meta, "connection lost"),
        )
    });
    let (client, eventloop) = connect_options(config, will)?;
    let sched = Scheduler::new(
        super::scheduler::Settings {
            mode: config.batch.payload,
            max_payload: config.batch.max_bytes.0 as usize,
            max_inflight: settings.window,
            // Fixed header, topic length, packet id; TLS adds its record header per flush.
            overhead: settings.topic.len() + 9,
            ack_timeout: m.ack_timeout.0,
        },
        Instant::now().into_std(),
    );
    let (link_tx, link_rx) = mpsc::unbounded_channel();
    let (resume_tx, resume_rx) = mpsc::channel(1);
    let (kick_tx, kick_rx) = mpsc::channel(1);
    let network_up = Arc::new(Notify::new());
    super::netwatch::start(network_up.clone());
    let link_stop = CancellationToken::new();
    let link = tokio::spawn(connection::run(
        eventloop,
        link_tx,
        connection::Control {
            resume: resume_rx,
            kick: kick_rx,
            network_up,
            connect_timeout: m.connect_timeout.0,
            stop: link_stop.clone(),
        },
        Backoff {
            min: m.reconnect_min.0,
            max: m.reconnect_max.0,
            attempt: 0,
        },
    ));
    let mut p = Publisher {
        sched,
        client,
        topic: settings.topic,
        endpoint: settings.endpoint,
        shutdown_timeout: settings.shutdown_timeout,
        limits: RateLimits::new(
            config.delivery.max_publish_per_sec,
            config.delivery.max_bytes_per_sec.0,
        ),
        stats,
        spool_stats: inputs.spool_stats.clone(),
        spool: inputs.spool.clone(),
        status,
        kick_tx,
        resume_tx,
        connected: false,
        ever_connected: false,
        kicked: false,
        outage: None,
        last_progress: Instant::now(),
        hard_deadline: None,
        rate_wait: None,
    };
    let link_rx = p.drive(inputs, link_rx, &stop).await;
    p.goodbye(link_rx).await;
    link_stop.cancel();
    let _ = link.await;
    Ok(())
}

/// The publisher's state between events.
struct Publisher {
    sched: Scheduler,
    client: AsyncClient,
    topic: String,
    endpoint: String,
    shutdown_timeout: Duration,
    limits: RateLimits,
    stats: Arc<Stats>,
    spool_stats: Arc<crate::spool::SpoolStats>,
    spool: std::sync::mpsc::Sender<Cmd>,
    status: Option<StatusTopics>,
    kick_tx: mpsc::Sender<String>,
    resume_tx: mpsc::Sender<()>,
    connected: bool,
    ever_connected: bool,
    /// The connection task was asked to drop the connection and has not yet.
    kicked: bool,
    /// Since when, of which kind, and how many attempts the current outage has seen.
    outage: Option<(Instant, Class, u32)>,
    /// The last PUBACK or connect (a finished run waits `shutdown_timeout` from it).
    last_progress: Instant,
    /// Set at a stop: the run ends by then at the latest.
    hard_deadline: Option<Instant>,
    /// The rate limits hold the next message until then.
    rate_wait: Option<Instant>,
}

impl Publisher {
    /// The event loop; returns the link events receiver for the goodbye.
    async fn drive(
        &mut self,
        inputs: Inputs,
        mut link_rx: mpsc::UnboundedReceiver<LinkEvent>,
        stop: &CancellationToken,
    ) -> mpsc::UnboundedReceiver<LinkEvent> {
        let Inputs {
            mut live,
            mut backlog,
            upstream_done,
            ..
        } = inputs;
        let (mut live_done, mut backlog_done) = (false, false);
        let mut status_tick = tokio::time::interval(
            self.status
                .as_ref()
                .map_or(Duration::from_secs(3600), |st| st.settings.interval),
        );
        status_tick.tick().await;
        let mut heartbeat = tokio::time::interval(Duration::from_millis(250));
        loop {
            Stats::add(&self.stats.publisher_beats, 1);
            self.stats
                .connected
                .store(u64::from(self.connected), Relaxed);
            self.hand_over();
            publish_figures(&self.stats, &self.sched);
            if live_done && backlog_done && self.sched.is_idle() {
                break;
            }
            if self.hard_deadline.is_none() && stop.is_cancelled() {
                // A stop: the batches still coming (the one closed at the stop) go out, the
                // backlog stays in the spool for the next start.
                self.hard_deadline = Some(Instant::now() + self.shutdown_timeout);
                self.sched.hold_backlog();
            }
            if self.hard_deadline.is_some() && live_done && self.sched.live_settled() {
                break;
            }
            let deadline = match (self.hard_deadline, upstream_done.is_cancelled()) {
                (Some(d), _) => Some(d),
                (None, true) => Some(self.last_progress + self.shutdown_timeout),
                (None, false) => None,
            };
            let want_live = self.sched.live_queued() < LIVE_HELD;
            let want_backlog = self.hard_deadline.is_none() && self.sched.wants_backlog();
            tokio::select! {
                biased;
                ev = link_rx.recv() => match ev {
                    Some(LinkEvent::Closed) | None => break,
                    Some(ev) => self.on_link(ev).await,
                },
                p = live.recv(), if want_live && !live_done => match p {
                    Some(p) => p.batches.iter().for_each(|b| self.sched.push_live(b)),
                    None => live_done = true,
                },
                p = backlog.recv(), if want_backlog && !backlog_done => match p {
                    Some(p) => {
                        p.batches.iter().for_each(|b| self.sched.push_backlog(b));
                        let _ = self.spool.send(Cmd::Wake);
                    }
                    None => backlog_done = true,
                },
                _ = sleep_until_opt(self.rate_wait), if self.rate_wait.is_some() && self.connected => {}
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    if !(self.sched.is_idle() && live_done && backlog_done) {
                        tracing::warn!(
                            "stopping with {} batch(es) ({} readings) in flight not acknowledged; the spool keeps them",
                            self.sched.open_batches(), self.sched.open_records()
                        );
                    }
                    break;
                }
                _ = stop.cancelled(), if self.hard_deadline.is_none() => {}
                _ = heartbeat.tick() => self.check_overdue(),
                _ = status_tick.tick(), if self.status.is_some() => {
                    if let Some(st) = &self.status {
                        self.sched.set_status(st.snapshot(&self.stats, &self.spool_stats));
                    }
                }
                _ = upstream_done.cancelled(), if !upstream_done.is_cancelled() => {
                    self.last_progress = Instant::now();
                }
            }
        }
        link_rx
    }

    async fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected => self.on_connected(),
            LinkEvent::Sent(pkid) => match self.sched.on_sent(pkid) {
                Some(len) => {
                    Stats::add(&self.stats.messages_published, 1);
                    Stats::add(&self.stats.bytes_published, len as u64);
                }
                None => tracing::warn!("publish with packet id {pkid} matches no message"),
            },
            LinkEvent::PubAck(pkid) => self.on_puback(pkid),
            LinkEvent::Disconnected(err) => {
                self.on_disconnected(&err);
                // The connection task clears rumqttc's queues once nothing more is handed over.
                let _ = self.resume_tx.send(()).await;
            }
            LinkEvent::Closed => {}
        }
    }

    fn on_connected(&mut self) {
        self.connected = true;
        // A link back is progress: a finished run gets its full wait again.
        self.last_progress = Instant::now();
        self.sched.on_connect(Instant::now().into_std());
        if self.ever_connected {
            Stats::add(&self.stats.reconnects, 1);
        }
        self.ever_connected = true;
        match self.outage.take() {
            Some((since, _, attempts)) => tracing::info!(
                "connected to {} after {:.1}s and {attempts} failed attempt(s); {} message(s) waiting",
                self.endpoint,
                since.elapsed().as_secs_f64(),
                self.sched.queued()
            ),
            None => tracing::info!("connected to {}", self.endpoint),
        }
        if let Some(st) = &self.status {
            self.sched.push_urgent(st.online());
        }
    }

    fn on_puback(&mut self, pkid: u16) {
        Stats::add(&self.stats.pubacks, 1);
        self.stats.last_ack_ms.store(
            (crate::ops::clock::wall_now_us() / 1000).max(0) as u64,
            Relaxed,
        );
        self.last_progress = Instant::now();
        let mut completed = Vec::new();
        if self
            .sched
            .on_puback(Instant::now().into_std(), pkid, &mut completed)
        {
            for a in completed {
                Stats::add(&self.stats.batches_acked, 1);
                Stats::add(&self.stats.readings_acked, a.records as u64);
                let _ = self.spool.send(Cmd::Ack(a.seq));
            }
        }
    }

    fn on_disconnected(&mut self, err: &LinkError) {
        self.kicked = false;
        self.stats.set_last_error(err.class.name(), err.to_string());
        let requeued = self.sched.on_disconnect();
        Stats::add(&self.stats.republished, requeued as u64);
        report_failure(
            &mut self.outage,
            err,
            &self.endpoint,
            self.connected.then_some(requeued),
        );
        self.connected = false;
    }

    /// Asks the connection task to drop a connection whose acknowledgements are overdue.
    fn check_overdue(&mut self) {
        if !self.connected || self.kicked {
            return;
        }
        let Some(why) = self.sched.overdue(Instant::now().into_std()) else {
            return;
        };
        let why = match why {
            Overdue::Stalled(d) => format!(
                "nothing acknowledged for {:.0}s (the broker or the link is dead)",
                d.as_secs_f64()
            ),
            Overdue::Lost(d) => format!(
                "no PUBACK for {:.0}s while later messages were acknowledged (the broker throttles silently)",
                d.as_secs_f64()
            ),
        };
        self.kicked = self.kick_tx.try_send(why).is_ok();
    }

    /// Hands the client every message the scheduler and the rate limits let go now.
    fn hand_over(&mut self) {
        if !self.connected || self.rate_wait.is_some_and(|w| w > Instant::now()) {
            return;
        }
        self.rate_wait = None;
        let now = Instant::now().into_std();
        let limits = &mut self.limits;
        while let Some(msg) = self.sched.next(now, &mut |len| limits.admit(len)) {
            let (to, retain) = match &msg.control {
                Some(c) => (c.topic.clone(), c.retain),
                None => (self.topic.clone(), false),
            };
            if let Err(e) = self
                .client
                .try_publish(to, QoS::AtLeastOnce, retain, msg.payload)
            {
                tracing::debug!("MQTT client queue full, retrying later: {e}");
                self.sched.unsend_last();
                break;
            }
        }
        if let Some(w) = self.limits.wait.take() {
            self.rate_wait = Some(Instant::now() + w);
        }
    }

    /// A retained offline message, then DISCONNECT, so the broker does not fire the last
    /// will.
    async fn goodbye(&mut self, mut link_rx: mpsc::UnboundedReceiver<LinkEvent>) {
        if !self.connected {
            return;
        }
        if let Some(st) = &self.status {
            let bye = crate::ops::health::offline(&st.settings.meta, "stopped");
            let _ = self
                .client
                .try_publish(st.settings.topic.clone(), QoS::AtLeastOnce, true, bye);
        }
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(ev) = link_rx.recv().await {
                    if matches!(ev, LinkEvent::Closed) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

fn publish_figures(stats: &Stats, sched: &Scheduler) {
    let Figures {
        rate_bps,
        rtt_ms,
        inflight_bytes,
        inflight_messages,
        window_bytes,
        message_bytes,
        ..
    } = sched.figures();
    stats.inflight.store(inflight_messages, Relaxed);
    stats.link_rate_bps.store(rate_bps, Relaxed);
    stats.link_rtt_ms.store(rtt_ms, Relaxed);
    stats.link_queued_bytes.store(inflight_bytes, Relaxed);
    stats.link_window_bytes.store(window_bytes, Relaxed);
    stats.link_message_bytes.store(message_bytes, Relaxed);
    stats.bytes_resent.store(sched.resent_bytes, Relaxed);
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
