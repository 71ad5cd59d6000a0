//! The signal table sampled on a fixed grid: one `Reading` per tick.
//!
//! The grid is anchored to the epoch: tick `n` is at `n * 1_000_000 / rate_hz` µs, so
//! 10 Hz readings land on whole 100 ms and hours of ticks accumulate no drift.

use crate::config::{Config, FieldType};
use crate::ops::stats::{NullReason, Stats};
use crate::sample::record::Reading;
use crate::sample::signal::{Micros, SignalTable, SignalUpdate};
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
struct FieldRule {
    ty: FieldType,
    min: f64,
    max: f64,
    /// 10^decimals, when float values are rounded.
    scale: Option<f64>,
}

/// Turns the latest values into readings; counts every null by field and reason.
pub struct Sampler {
    rules: Vec<FieldRule>,
    rate_hz: i128,
    stale_after: Micros,
    table: SignalTable,
    pub(crate) stats: Arc<Stats>,
}

impl Sampler {
    pub fn new(config: &Config, stats: Arc<Stats>) -> Self {
        let rules: Vec<FieldRule> = config
            .fields
            .values()
            .map(|f| FieldRule {
                ty: f.ty,
                min: f.min,
                max: f.max,
                scale: f.decimals.map(|d| 10f64.powi(i32::from(d))),
            })
            .collect();
        Self {
            table: SignalTable::new(rules.len()),
            rules,
            rate_hz: i128::from(config.sampling.rate_hz),
            stale_after: config.sampling.stale_after.0.as_micros() as Micros,
            stats,
        }
    }

    pub fn apply(&mut self, update: SignalUpdate) {
        self.table.apply(update);
    }

    /// The instant of tick `n`.
    pub fn tick_time(&self, n: i64) -> Micros {
        (i128::from(n) * 1_000_000 / self.rate_hz) as Micros
    }

    /// The first tick at or after `t`.
    pub fn first_tick_at_or_after(&self, t: Micros) -> i64 {
        let n = (i128::from(t) * self.rate_hz).div_euclid(1_000_000) as i64;
        if self.tick_time(n) >= t { n } else { n + 1 }
    }

    /// The last tick at or before `t`.
    pub fn last_tick_at_or_before(&self, t: Micros) -> i64 {
        let n = self.first_tick_at_or_after(t);
        if self.tick_time(n) == t { n } else { n - 1 }
    }

    /// The reading at tick time `at`.
    pub fn sample(&mut self, at: Micros) -> Reading {
        let values = (0..self.rules.len())
            .map(|field| {
                let checked = self.check(field, at);
                if let Err(reason) = checked {
                    self.stats.null(field, reason);
                }
                checked.ok()
            })
            .collect();
        Stats::add(&self.stats.readings, 1);
        Reading { at, values }
    }

    fn check(&self, field: usize, at: Micros) -> Result<f64, NullReason> {
        let rule = self.rules[field];
        let (value, age) = self.table.get(field, at).ok_or(NullReason::Missing)?;
        if age > self.stale_after {
            return Err(NullReason::Stale);
        }
        if !value.is_finite() {
            return Err(NullReason::NonFinite);
        }
        let value = match rule.ty {
            FieldType::Int => value.round(),
            FieldType::Float => match rule.scale {
                Some(scale) => (value * scale).round() / scale,
                None => value,
            },
        };
        if value < rule.min || value > rule.max {
            return Err(NullReason::OutOfRange);
        }
        Ok(value)
    }
}

/// Drives a sampler on the data's own clock (simulation, replay): a tick at `T` is taken
/// once the data has moved past `T`, and includes every update stamped at or before `T`.
pub struct DataClock {
    sampler: Sampler,
    next: Option<i64>,
    /// The instant of the newest value seen.
    last_data: Option<Micros>,
}

/// Ticks made after the data stops before the rest of a silence is skipped: a minute of
/// readings going stale shows the silence; days of them (a log with one far-future line,
/// logs of several days joined) would only fill memory and the spool.
pub const MAX_SILENCE: Micros = 60_000_000;

impl DataClock {
    pub fn new(sampler: Sampler) -> Self {
        Self {
            sampler,
            next: None,
            last_data: None,
        }
    }

    pub fn update(&mut self, update: SignalUpdate, out: &mut Vec<Reading>) {
        self.advance_before(update.at, out);
        self.last_data = Some(self.last_data.map_or(update.at, |l| l.max(update.at)));
        self.sampler.apply(update);
    }

    /// The data's clock reached `t`: every tick before `t` is due, but at most
    /// `MAX_SILENCE` of them after the newest value; the rest of a longer silence is
    /// skipped, counted and logged.
    pub fn advance_before(&mut self, t: Micros, out: &mut Vec<Reading>) {
        let next = *self
            .next
            .get_or_insert_with(|| self.sampler.first_tick_at_or_after(t));
        let mut n = next;
        let quiet_until = self.last_data.map(|l| l + MAX_SILENCE);
        while self.sampler.tick_time(n) < t {
            let at = self.sampler.tick_time(n);
            if quiet_until.is_some_and(|q| at >= q) {
                let resume = self.sampler.first_tick_at_or_after(t);
                let skipped = resume - n;
                Stats::add(&self.sampler.stats.ticks_skipped, skipped as u64);
                tracing::warn!(
                    "the data is silent from {} ms to {} ms ({:.1} h): {skipped} tick(s) of it skipped",
                    self.last_data.unwrap_or(at) / 1000,
                    t / 1000,
                    (t - self.last_data.unwrap_or(at)) as f64 / 3.6e9
                );
                n = resume;
                break;
            }
            out.push(self.sampler.sample(at));
            n += 1;
        }
        self.next = Some(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sampler() -> Sampler {
        let config = Config::bench_default();
        Sampler::new(&config, Arc::new(Stats::new(config.field_names())))
    }

    const T0: Micros = 1_705_267_200_000_000;

    #[test]
    fn a_far_future_value_does_not_make_every_tick_in_between() {
        let stats = Arc::new(Stats::new(Config::bench_default().field_names()));
        let mut clock = DataClock::new(Sampler::new(&Config::bench_default(), stats.clone()));
        let mut out = Vec::new();
        let u = |at| SignalUpdate {
            field: 2,
            value: 7000.0,
            at,
        };
        clock.update(u(T0), &mut out);
        clock.update(u(T0 + 1_000_000), &mut out);
        assert_eq!(out.len(), 10);
        // Three days later: a minute of readings going stale, then the new data.
        let later = T0 + 3 * 86_400_000_000;
        clock.update(u(later), &mut out);
        assert_eq!(
            out.len(),
            10 + 600,
            "a minute of silence after the last value"
        );
        clock.advance_before(later + 500_000, &mut out);
        assert_eq!(out.len(), 615, "ticks resume at the new data");
        assert_eq!(out[614].at, later + 400_000);
        let skipped = Stats::get(&stats.ticks_skipped);
        assert_eq!(skipped as i64, (later - T0 - 1_000_000) / 100_000 - 600);
    }

    #[test]
    fn an_hour_at_10hz_is_36000_readings_100ms_apart_without_drift() {
        let mut clock = DataClock::new(sampler());
        let mut out = Vec::new();
        // Updates every 7 ms (not a divisor of 100 ms) for one hour.
        let mut t = T0;
        while t < T0 + 3_600_000_000 {
            clock.update(
                SignalUpdate {
                    field: 2,
                    value: 7000.0,
                    at: t,
                },
                &mut out,
            );
            t += 7_000;
        }
        clock.advance_before(T0 + 3_600_000_000, &mut out);
        assert_eq!(out.len(), 36_000);
        for (k, r) in out.iter().enumerate() {
            assert_eq!(r.timestamp_ms(), T0 / 1000 + 100 * k as i64);
        }
        assert_eq!(out[35_999].values[2], Some(7000.0));
    }

    #[test]
    fn grid_for_rates_that_do_not_divide_a_second() {
        let config = Config {
            sampling: crate::config::Sampling {
                rate_hz: 3,
                ..Default::default()
            },
            ..Config::bench_default()
        };
        let s = Sampler::new(&config, Arc::new(Stats::new(config.field_names())));
        assert_eq!(s.tick_time(3), 1_000_000);
        assert_eq!(s.tick_time(1), 333_333);
        assert_eq!(s.first_tick_at_or_after(333_334), 2);
        assert_eq!(s.last_tick_at_or_before(333_334), 1);
        assert_eq!(s.first_tick_at_or_after(-1), 0);
    }

    #[test]
    fn null_reasons_are_counted_per_field() {
        let config = Config::bench_default();
        let stats = Arc::new(Stats::new(config.field_names()));
        let mut s = Sampler::new(&config, stats.clone());
        let stale = config.sampling.stale_after.0;
        s.apply(SignalUpdate {
            field: 0,
            value: f64::NAN,
            at: T0,
        });
        s.apply(SignalUpdate {
            field: 1,
            value: 5000.0,
            at: T0,
        });
        s.apply(SignalUpdate {
            field: 2,
            value: 7850.4,
            at: T0 - stale.as_micros() as i64 - 1,
        });
        let r = s.sample(T0);
        assert_eq!(r.values, vec![None, None, None, None]);
        assert_eq!(stats.nulls(0, NullReason::NonFinite), 1);
        assert_eq!(stats.nulls(1, NullReason::OutOfRange), 1);
        assert_eq!(stats.nulls(2, NullReason::Stale), 1);
        assert_eq!(stats.nulls(3, NullReason::Missing), 1);
        // At exactly `stale_after` a value is still fresh; ints are rounded.
        s.apply(SignalUpdate {
            field: 2,
            value: 7850.6,
            at: T0,
        });
        let r = s.sample(T0 + Duration::from_millis(500).as_micros() as i64);
        assert_eq!(r.values[2], Some(7851.0));
        s.apply(SignalUpdate {
            field: 3,
            value: -40.0,
            at: T0,
        });
        let r = s.sample(T0);
        assert_eq!(r.values[3], Some(-40.0));
    }

    #[test]
    fn a_tick_includes_updates_stamped_at_its_instant() {
        let mut clock = DataClock::new(sampler());
        let mut out = Vec::new();
        clock.advance_before(T0, &mut out);
        clock.update(
            SignalUpdate {
                field: 0,
                value: 1.0,
                at: T0,
            },
            &mut out,
        );
        assert!(out.is_empty());
        clock.update(
            SignalUpdate {
                field: 0,
                value: 2.0,
                at: T0 + 1,
            },
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].values[0], Some(1.0));
    }
}
