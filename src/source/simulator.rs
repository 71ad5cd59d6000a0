//! A deterministic GT3 car lapping a fixed circuit, driven only by its own simulated clock.
//!
//! The car follows a track of straights, braking zones and corners with a simple longitudinal
//! model (power- and traction-limited drive, aerodynamic drag, speed-dependent peak braking),
//! a six-speed sequential gearbox, front brake discs heated by braking power and cooled by
//! airflow, and an oil circuit warming from ambient. Sensors sample that state on their own
//! schedules with small seeded noise. With faults enabled, dropouts, non-finite values and
//! out-of-range values are injected on a seeded schedule.
//!
//! Everything is integer time (step counter) plus IEEE basic arithmetic, so the same seed and
//! start give the same sequence on every platform.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::sample::signal::Micros;

/// A simulated sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sensor {
    /// Front-left brake disc temperature, °C (every 50 ms).
    BrakeDiscTempFl,
    /// Front-right brake disc temperature, °C (every 50 ms).
    BrakeDiscTempFr,
    /// Engine speed, integer rpm (every 10 ms).
    EngineRpm,
    /// Engine oil temperature, °C (every 200 ms).
    EngineOilTemp,
}

impl Sensor {
    /// Every sensor, in the order updates within one step are emitted.
    pub const ALL: [Sensor; 4] = [
        Sensor::BrakeDiscTempFl,
        Sensor::BrakeDiscTempFr,
        Sensor::EngineRpm,
        Sensor::EngineOilTemp,
    ];

    /// The record field name: "brake_disc_temp_fl", "brake_disc_temp_fr", "engine_rpm", "engine_oil_temp".
    pub fn name(self) -> &'static str {
        match self {
            Sensor::BrakeDiscTempFl => "brake_disc_temp_fl",
            Sensor::BrakeDiscTempFr => "brake_disc_temp_fr",
            Sensor::EngineRpm => "engine_rpm",
            Sensor::EngineOilTemp => "engine_oil_temp",
        }
    }

    /// Update period in physics steps (10 ms each).
    fn period_steps(self) -> u64 {
        match self {
            Sensor::EngineRpm => 1,
            Sensor::BrakeDiscTempFl | Sensor::BrakeDiscTempFr => 5,
            Sensor::EngineOilTemp => 20,
        }
    }

    fn index(self) -> usize {
        match self {
            Sensor::BrakeDiscTempFl => 0,
            Sensor::BrakeDiscTempFr => 1,
            Sensor::EngineRpm => 2,
            Sensor::EngineOilTemp => 3,
        }
    }
}

/// One sensor reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimUpdate {
    /// Sample instant on the simulated clock.
    pub at: Micros,
    /// The sensor that produced the value.
    pub sensor: Sensor,
    /// The value as the sensor reports it (non-finite or out of range under an injected fault).
    pub value: f64,
}

const STEP_US: i64 = 10_000;
const DT: f64 = 0.01;
const STEPS_PER_S: u64 = 100;

const AMBIENT_C: f64 = 25.0;
const G: f64 = 9.81;
const MASS_KG: f64 = 1350.0;
const WHEEL_POWER_W: f64 = 370_000.0;
/// Rear-axle traction limit.
const TRACTION_N: f64 = 8_700.0;
/// 0.5 * rho * CdA with a high-downforce GT3 setup.
const DRAG_K: f64 = 0.69;
const ROLLING_N: f64 = 0.015 * MASS_KG * G;

/// Engine rpm per m/s of road speed in each gear (gearbox * final drive / wheel circumference).
const GEAR_RPM_PER_MPS: [f64; 6] = [390.0, 300.0, 232.0, 183.0, 146.0, 118.0];
const UPSHIFT_RPM: f64 = 8_300.0;
/// Downshift once the lower gear would land at or below this.
const DOWNSHIFT_TARGET_RPM: f64 = 7_000.0;
const LIMITER_RPM: f64 = 8_700.0;
/// Below this the clutch slips rather than letting the engine bog down.
const MIN_RPM: f64 = 3_500.0;
const MAX_RPM: f64 = 8_950.0;
/// Minimum time between two gear changes.
const SHIFT_GAP_STEPS: u32 = 12;

/// Share of braking power going to the front axle.
const FRONT_BIAS: f64 = 0.62;
/// Share of braking heat that goes into the disc rather than the pads.
const DISC_HEAT_SHARE: f64 = 0.9;
/// Effective heat capacity of the disc surface layer the sensor sees, J/K.
const DISC_HEAT_CAPACITY: f64 = 1_600.0;
/// FR runs slightly hotter (more right-hand corners) and its duct cools slightly less.
const DISC_HEAT_FACTOR: [f64; 2] = [1.0, 1.03];
const DISC_COOL_FACTOR: [f64; 2] = [1.0, 0.97];
/// Convective cooling rate, 1/s, as `a + b * speed`.
const DISC_COOL_BASE: f64 = 0.006;
const DISC_COOL_PER_MPS: f64 = 0.0008;

const OIL_TAU_S: f64 = 150.0;
const OIL_BASE_C: f64 = 102.0;
const OIL_PER_LOAD_C: f64 = 16.0;

#[derive(Debug, Clone, Copy)]
enum Segment {
    Straight {
        len_m: f64,
    },
    /// Brake so as to reach `to_kph` at the end of the zone.
    Brake {
        len_m: f64,
        to_kph: f64,
    },
    Corner {
        len_m: f64,
        kph: f64,
    },
}

impl Segment {
    fn len_m(self) -> f64 {
        match self {
            Segment::Straight { len_m }
            | Segment::Brake { len_m, .. }
            | Segment::Corner { len_m, .. } => len_m,
        }
    }
}

const TRACK: [Segment; 21] = [
    Segment::Straight { len_m: 750.0 },
    Segment::Brake {
        len_m: 150.0,
        to_kph: 80.0,
    },
    Segment::Corner {
        len_m: 120.0,
        kph: 80.0,
    },
    Segment::Straight { len_m: 300.0 },
    Segment::Brake {
        len_m: 90.0,
        to_kph: 130.0,
    },
    Segment::Corner {
        len_m: 170.0,
        kph: 130.0,
    },
    Segment::Straight { len_m: 250.0 },
    Segment::Brake {
        len_m: 100.0,
        to_kph: 100.0,
    },
    Segment::Corner {
        len_m: 150.0,
        kph: 100.0,
    },
    Segment::Straight { len_m: 500.0 },
    Segment::Brake {
        len_m: 130.0,
        to_kph: 65.0,
    },
    Segment::Corner {
        len_m: 90.0,
        kph: 65.0,
    },
    Segment::Straight { len_m: 400.0 },
    Segment::Brake {
        len_m: 60.0,
        to_kph: 180.0,
    },
    Segment::Corner {
        len_m: 250.0,
        kph: 180.0,
    },
    Segment::Straight { len_m: 300.0 },
    Segment::Brake {
        len_m: 110.0,
        to_kph: 95.0,
    },
    Segment::Corner {
        len_m: 160.0,
        kph: 95.0,
    },
    Segment::Straight { len_m: 550.0 },
    Segment::Brake {
        len_m: 120.0,
        to_kph: 120.0,
    },
    Segment::Corner {
        len_m: 200.0,
        kph: 120.0,
    },
];

/// Approximately standard normal: the sum of three uniforms, rescaled. Pure arithmetic, so
/// bit-identical everywhere (unlike Box-Muller's `ln`/`cos`).
fn gauss(rng: &mut Pcg64Mcg) -> f64 {
    let s: f64 = rng.random::<f64>() + rng.random::<f64>() + rng.random::<f64>();
    (s - 1.5) * 2.0
}

fn max_brake_decel(v: f64) -> f64 {
    // Downforce adds grip with speed: ~1.3 g slow, ~1.8 g at 250 km/h.
    12.5 + 0.075 * v
}

#[derive(Debug, Clone)]
struct Car {
    seg: usize,
    pos_m: f64,
    lap: u64,
    speed: f64,
    gear: usize,
    shift_wait: u32,
    throttle: f64,
    /// Per-lap driver variation of corner speeds and braking effort.
    corner_factor: f64,
    brake_factor: f64,
    disc_c: [f64; 2],
    oil_c: f64,
}

impl Car {
    fn new() -> Self {
        // Rolling out of the last corner onto the main straight with a cold car.
        let speed = 33.0;
        Car {
            seg: 0,
            pos_m: 0.0,
            lap: 0,
            speed,
            gear: gear_for(speed),
            shift_wait: 0,
            throttle: 0.0,
            corner_factor: 1.0,
            brake_factor: 1.0,
            disc_c: [AMBIENT_C; 2],
            oil_c: AMBIENT_C,
        }
    }

    fn rpm(&self) -> f64 {
        (self.speed * GEAR_RPM_PER_MPS[self.gear]).clamp(MIN_RPM, MAX_RPM)
    }

    fn step(&mut self, rng: &mut Pcg64Mcg) {
        let v = self.speed;
        let drag = DRAG_K * v * v + ROLLING_N;
        let on_limiter = self.gear == GEAR_RPM_PER_MPS.len() - 1 && self.rpm() >= LIMITER_RPM;
        let drive_max = if on_limiter {
            0.0
        } else {
            (WHEEL_POWER_W / v.max(1.0)).min(TRACTION_N)
        };

        // Longitudinal intent: either a target deceleration (brakes) or a drive force.
        let mut decel_target: Option<f64> = None;
        let mut drive = drive_max;
        let mut hold = |target: f64| {
            if v > target + 0.3 {
                // Trail braking into a corner entered too fast.
                decel_target = Some(((v - target) * 2.0).min(6.0));
                0.0
            } else {
                let want = MASS_KG * (target - v) + drag;
                want.clamp(0.0, drive_max)
            }
        };
        match TRACK[self.seg] {
            Segment::Straight { .. } => {}
            Segment::Brake { len_m, to_kph } => {
                let target = to_kph / 3.6 * self.corner_factor;
                if v > target {
                    let remaining = (len_m - self.pos_m).max(0.5);
                    let needed = (v * v - target * target) / (2.0 * remaining);
                    decel_target = Some(needed.min(max_brake_decel(v) * self.brake_factor));
                    drive = 0.0;
                } else {
                    drive = hold(target);
                }
            }
            Segment::Corner { kph, .. } => drive = hold(kph / 3.6 * self.corner_factor),
        }

        let (accel, brake_force) = match decel_target {
            Some(d) => {
                let brake_force = (MASS_KG * d - drag).max(0.0);
                (-(brake_force + drag) / MASS_KG, brake_force)
            }
            None => ((drive - drag) / MASS_KG, 0.0),
        };
        self.throttle = if drive_max > 0.0 {
            drive / drive_max
        } else {
            1.0
        };

        // Brakes: heat from braking power, convective cooling growing with airflow.
        let brake_power = brake_force * v;
        for (i, t) in self.disc_c.iter_mut().enumerate() {
            let heat = brake_power * FRONT_BIAS * 0.5 * DISC_HEAT_SHARE * DISC_HEAT_FACTOR[i];
            let cool = (DISC_COOL_BASE + DISC_COOL_PER_MPS * v) * DISC_COOL_FACTOR[i];
            *t += (heat / DISC_HEAT_CAPACITY - cool * (*t - AMBIENT_C)) * DT;
        }

        let oil_target = OIL_BASE_C + OIL_PER_LOAD_C * self.throttle;
        self.oil_c += (oil_target - self.oil_c) * DT / OIL_TAU_S;

        self.speed = (v + accel * DT).max(1.0);
        self.pos_m += self.speed * DT;
        while self.pos_m >= TRACK[self.seg].len_m() {
            self.pos_m -= TRACK[self.seg].len_m();
            self.seg += 1;
            if self.seg == TRACK.len() {
                self.seg = 0;
                self.lap += 1;
                self.corner_factor = 1.0 + 0.02 * gauss(rng) / 3.0;
                self.brake_factor = 1.0 + 0.03 * gauss(rng) / 3.0;
            }
        }

        self.shift_gears(decel_target.is_some());
    }

    fn shift_gears(&mut self, braking: bool) {
        if self.shift_wait > 0 {
            self.shift_wait -= 1;
            return;
        }
        let raw_rpm = self.speed * GEAR_RPM_PER_MPS[self.gear];
        let top = GEAR_RPM_PER_MPS.len() - 1;
        if !braking && raw_rpm >= UPSHIFT_RPM && self.gear < top {
            self.gear += 1;
            self.shift_wait = SHIFT_GAP_STEPS;
        } else if self.gear > 0
            && self.speed * GEAR_RPM_PER_MPS[self.gear - 1] <= DOWNSHIFT_TARGET_RPM
            && (braking || raw_rpm < 5_000.0)
        {
            self.gear -= 1;
            self.shift_wait = SHIFT_GAP_STEPS;
        }
    }
}

/// The gear a driver would be in at this speed: the lowest one below the upshift point.
fn gear_for(speed: f64) -> usize {
    GEAR_RPM_PER_MPS
        .iter()
        .position(|r| speed * r < UPSHIFT_RPM - 500.0)
        .unwrap_or(GEAR_RPM_PER_MPS.len() - 1)
}

/// Seeded fault schedule. Each kind fires once in the first minute, then every 90-240 s.
#[derive(Debug, Clone)]
struct Faults {
    rng: Pcg64Mcg,
    next_dropout: u64,
    next_non_finite: u64,
    next_out_of_range: u64,
    /// Step index from which each sensor reports again.
    silent_until: [u64; 4],
    pending_non_finite: [bool; 4],
    pending_out_of_range: [bool; 4],
}

impl Faults {
    fn new(seed: u64) -> Self {
        let mut rng = Pcg64Mcg::seed_from_u64(seed ^ 0x6a09_e667_f3bc_c908);
        // Dropouts end by 55 s and one-shot faults land by 50 s, so a one-minute run shows
        // every kind even if a one-shot fault waits out a dropout on the same sensor.
        let mut first = || rng.random_range(3 * STEPS_PER_S..=50 * STEPS_PER_S);
        let (next_dropout, next_non_finite, next_out_of_range) = (first(), first(), first());
        Faults {
            rng,
            next_dropout,
            next_non_finite,
            next_out_of_range,
            silent_until: [0; 4],
            pending_non_finite: [false; 4],
            pending_out_of_range: [false; 4],
        }
    }

    fn interval(&mut self) -> u64 {
        self.rng.random_range(90 * STEPS_PER_S..=240 * STEPS_PER_S)
    }

    fn pick_sensor(&mut self) -> usize {
        self.rng.random_range(0..Sensor::ALL.len() as u32) as usize
    }

    fn schedule(&mut self, k: u64) {
        if k == self.next_dropout {
            let s = self.pick_sensor();
            let len = self.rng.random_range(STEPS_PER_S..=5 * STEPS_PER_S);
            self.silent_until[s] = self.silent_until[s].max(k + len);
            self.next_dropout = k + self.interval();
        }
        if k == self.next_non_finite {
            let s = self.pick_sensor();
            self.pending_non_finite[s] = true;
            self.next_non_finite = k + self.interval();
        }
        if k == self.next_out_of_range {
            let s = self.pick_sensor();
            self.pending_out_of_range[s] = true;
            self.next_out_of_range = k + self.interval();
        }
    }

    /// The reported value for a due update, or `None` while the sensor is silent.
    fn apply(&mut self, k: u64, sensor: Sensor, value: f64) -> Option<f64> {
        let i = sensor.index();
        if k < self.silent_until[i] {
            return None;
        }
        if self.pending_non_finite[i] {
            self.pending_non_finite[i] = false;
            let choices = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
            return Some(choices[self.rng.random_range(0..3u32) as usize]);
        }
        if self.pending_out_of_range[i] {
            self.pending_out_of_range[i] = false;
            let choices = match sensor {
                Sensor::BrakeDiscTempFl | Sensor::BrakeDiscTempFr => [5_000.0, -100.0],
                Sensor::EngineRpm => [-50.0, 25_000.0],
                Sensor::EngineOilTemp => [400.0, -60.0],
            };
            return Some(choices[self.rng.random_range(0..2u32) as usize]);
        }
        Some(value)
    }
}

/// The car, its sensors and (optionally) their faults, on a simulated clock.
pub struct Simulator {
    start: Micros,
    /// Index of the next step; the simulated time is `start + step * 10 ms`.
    step: u64,
    car: Car,
    rng: Pcg64Mcg,
    faults: Option<Faults>,
}

impl Simulator {
    /// `start`: the simulated clock's start instant (µs since epoch). Same seed + same start => identical sequence.
    pub fn new(seed: u64, start: Micros, faults: bool) -> Self {
        Simulator {
            start,
            step: 0,
            car: Car::new(),
            rng: Pcg64Mcg::seed_from_u64(seed),
            faults: faults.then(|| Faults::new(seed)),
        }
    }

    /// Advance the simulation by one physics step (10 ms of simulated time) and return the
    /// sensor updates due in that step, in time order (appended to `out`, which the caller clears).
    /// Returns the simulated time reached after the step.
    ///
    /// The updates sample the state at the start of the step, so all data before the returned
    /// instant has been emitted.
    pub fn step(&mut self, out: &mut Vec<SimUpdate>) -> Micros {
        let k = self.step;
        let at = self.now();
        if let Some(f) = self.faults.as_mut() {
            f.schedule(k);
        }
        for sensor in Sensor::ALL {
            if !k.is_multiple_of(sensor.period_steps()) {
                continue;
            }
            let value = self.read(sensor);
            let value = match self.faults.as_mut() {
                Some(f) => f.apply(k, sensor, value),
                None => Some(value),
            };
            if let Some(value) = value {
                out.push(SimUpdate { at, sensor, value });
            }
        }
        self.car.step(&mut self.rng);
        self.step += 1;
        self.now()
    }

    /// Current simulated time.
    pub fn now(&self) -> Micros {
        self.start + self.step as i64 * STEP_US
    }

    fn read(&mut self, sensor: Sensor) -> f64 {
        let noise = gauss(&mut self.rng);
        match sensor {
            Sensor::BrakeDiscTempFl => (self.car.disc_c[0] + 1.5 * noise).clamp(-40.0, 1400.0),
            Sensor::BrakeDiscTempFr => (self.car.disc_c[1] + 2.0 * noise).clamp(-40.0, 1400.0),
            Sensor::EngineRpm => (self.car.rpm() + 12.0 * noise).round().clamp(0.0, 9_000.0),
            Sensor::EngineOilTemp => (self.car.oil_c + 0.15 * noise).clamp(-40.0, 200.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Micros = 1_700_000_000_000_000;
    const TEN_MINUTES: u64 = 600 * STEPS_PER_S;

    /// Each update with the lap it was sampled in.
    fn run(seed: u64, faults: bool, steps: u64) -> Vec<(u64, SimUpdate)> {
        let mut sim = Simulator::new(seed, START, faults);
        let mut out = Vec::new();
        let mut all = Vec::new();
        for k in 0..steps {
            out.clear();
            let lap = sim.car.lap;
            let now = sim.step(&mut out);
            assert_eq!(now, START + (k as i64 + 1) * STEP_US);
            assert_eq!(sim.now(), now);
            all.extend(out.iter().map(|u| (lap, *u)));
        }
        all
    }

    fn values(all: &[(u64, SimUpdate)], sensor: Sensor) -> Vec<(Micros, f64)> {
        all.iter()
            .filter(|(_, u)| u.sensor == sensor)
            .map(|(_, u)| (u.at, u.value))
            .collect()
    }

    fn fingerprint(all: &[(u64, SimUpdate)]) -> Vec<(Micros, Sensor, u64)> {
        all.iter()
            .map(|(_, u)| (u.at, u.sensor, u.value.to_bits()))
            .collect()
    }

    fn in_range(sensor: Sensor, v: f64) -> bool {
        match sensor {
            Sensor::BrakeDiscTempFl | Sensor::BrakeDiscTempFr => (-40.0..=1400.0).contains(&v),
            Sensor::EngineRpm => (0.0..=20_000.0).contains(&v) && v == v.round(),
            Sensor::EngineOilTemp => (-40.0..=200.0).contains(&v),
        }
    }

    #[test]
    fn names() {
        let names: Vec<_> = Sensor::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "brake_disc_temp_fl",
                "brake_disc_temp_fr",
                "engine_rpm",
                "engine_oil_temp"
            ]
        );
        for (i, s) in Sensor::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        for faults in [false, true] {
            let a = run(42, faults, TEN_MINUTES);
            let b = run(42, faults, TEN_MINUTES);
            assert_eq!(fingerprint(&a), fingerprint(&b));
        }
    }

    #[test]
    fn different_seeds_differ() {
        let a = run(1, false, 60 * STEPS_PER_S);
        let b = run(2, false, 60 * STEPS_PER_S);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let a = run(1, true, TEN_MINUTES);
        let b = run(2, true, TEN_MINUTES);
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }

    #[test]
    fn timestamps_are_on_the_step_grid_and_ordered() {
        let mut sim = Simulator::new(7, START, true);
        assert_eq!(sim.now(), START);
        let mut out = Vec::new();
        sim.step(&mut out);
        let mut first: Vec<_> = out.iter().map(|u| u.sensor).collect();
        first.sort_by_key(|s| s.index());
        assert_eq!(first, Sensor::ALL, "every sensor reports in the first step");
        assert!(out.iter().all(|u| u.at == START));

        let all = run(7, true, TEN_MINUTES);
        let mut prev = START;
        for (_, u) in &all {
            assert!(u.at >= prev);
            assert_eq!((u.at - START) % STEP_US, 0);
            prev = u.at;
        }
    }

    #[test]
    fn update_counts_match_rates() {
        for steps in [1_000, TEN_MINUTES] {
            let all = run(3, false, steps);
            let secs = steps as f64 / STEPS_PER_S as f64;
            for (sensor, per_s) in [
                (Sensor::EngineRpm, 100.0),
                (Sensor::BrakeDiscTempFl, 20.0),
                (Sensor::BrakeDiscTempFr, 20.0),
                (Sensor::EngineOilTemp, 5.0),
            ] {
                let n = values(&all, sensor).len() as f64;
                assert!((n - per_s * secs).abs() <= 1.0, "{sensor:?}: {n}");
            }
        }
    }

    #[test]
    fn values_are_physical_without_faults() {
        for seed in [0, 1, 99] {
            let all = run(seed, false, TEN_MINUTES);
            for (_, u) in &all {
                assert!(in_range(u.sensor, u.value), "{u:?}");
            }
            let rpm = values(&all, Sensor::EngineRpm);
            assert!(rpm.iter().all(|&(_, v)| (3_400.0..=9_000.0).contains(&v)));
        }
    }

    #[test]
    fn brakes_heat_and_cool_every_lap() {
        let all = run(5, false, TEN_MINUTES);
        let last_lap = all.last().map_or(0, |(lap, _)| *lap);
        assert!(
            last_lap >= 5,
            "lap time should be 100-120 s, got {last_lap} laps"
        );
        for sensor in [Sensor::BrakeDiscTempFl, Sensor::BrakeDiscTempFr] {
            // The last lap is incomplete.
            for lap in 0..last_lap {
                let temps: Vec<f64> = all
                    .iter()
                    .filter(|(l, u)| *l == lap && u.sensor == sensor)
                    .map(|(_, u)| u.value)
                    .collect();
                let max = temps.iter().copied().fold(f64::MIN, f64::max);
                let min = temps.iter().copied().fold(f64::MAX, f64::min);
                assert!(max > 600.0 && max < 900.0, "{sensor:?} lap {lap} max {max}");
                assert!(min < 450.0, "{sensor:?} lap {lap} min {min}");
            }
        }
        // FR runs a few percent hotter than FL.
        let fl = values(&all, Sensor::BrakeDiscTempFl);
        let fr = values(&all, Sensor::BrakeDiscTempFr);
        let (sum_fl, sum_fr) = fl
            .iter()
            .zip(&fr)
            .fold((0.0, 0.0), |(a, b), (l, r)| (a + l.1, b + r.1));
        let ratio = sum_fr / sum_fl;
        assert!(ratio > 1.005 && ratio < 1.08, "FR/FL ratio {ratio}");
    }

    #[test]
    fn lap_time_is_plausible() {
        let mut sim = Simulator::new(11, START, false);
        let mut out = Vec::new();
        let mut lap_starts = Vec::new();
        let mut lap = 0;
        for _ in 0..TEN_MINUTES {
            let now = sim.step(&mut out);
            if sim.car.lap != lap {
                lap = sim.car.lap;
                lap_starts.push(now);
            }
        }
        assert!(lap_starts.len() >= 4);
        for w in lap_starts.windows(2) {
            let secs = (w[1] - w[0]) as f64 / 1e6;
            assert!((100.0..=120.0).contains(&secs), "lap time {secs}");
        }
    }

    #[test]
    fn rpm_shows_gear_shifts() {
        let all = run(8, false, TEN_MINUTES);
        let rpm: Vec<f64> = values(&all, Sensor::EngineRpm)
            .iter()
            .map(|&(_, v)| v)
            .collect();
        // Upshifts: a drop of more than 1000 rpm within 100 ms (10 samples).
        let mut upshifts = 0;
        let mut i = 10;
        while i < rpm.len() {
            let peak = rpm[i - 10..i].iter().copied().fold(f64::MIN, f64::max);
            if peak - rpm[i] > 1_000.0 {
                upshifts += 1;
                i += 10;
            } else {
                i += 1;
            }
        }
        // Five laps at least, each with several full-throttle runs through the gears.
        assert!(upshifts >= 5 * 15, "only {upshifts} upshifts");
        let max = rpm.iter().copied().fold(f64::MIN, f64::max);
        assert!(max > 8_000.0 && max <= 9_000.0, "max rpm {max}");
    }

    #[test]
    fn oil_warms_up() {
        let all = run(4, false, TEN_MINUTES);
        let oil = values(&all, Sensor::EngineOilTemp);
        assert!((oil[0].1 - 25.0).abs() < 5.0, "start {}", oil[0].1);
        let warm_from = START + 480 * 1_000_000;
        let warm: Vec<f64> = oil
            .iter()
            .filter(|(at, _)| *at >= warm_from)
            .map(|&(_, v)| v)
            .collect();
        assert!(!warm.is_empty());
        assert!(warm.iter().all(|v| (100.0..=120.0).contains(v)), "{warm:?}");
        // Monotone-ish warm-up: one minute in it is clearly warmer but far from done.
        let at_60s = oil
            .iter()
            .find(|(at, _)| *at >= START + 60 * 1_000_000)
            .map_or(0.0, |&(_, v)| v);
        assert!((40.0..90.0).contains(&at_60s), "oil at 60 s {at_60s}");
    }

    /// The fault kinds seen in `all`: (dropout longer than 1 s, non-finite, out-of-range).
    fn fault_kinds(all: &[(u64, SimUpdate)]) -> (usize, usize, usize) {
        let mut gaps = 0;
        for sensor in Sensor::ALL {
            let v = values(all, sensor);
            gaps += v.windows(2).filter(|w| w[1].0 - w[0].0 > 1_000_000).count();
        }
        let non_finite = all.iter().filter(|(_, u)| !u.value.is_finite()).count();
        let out_of_range = all
            .iter()
            .filter(|(_, u)| u.value.is_finite() && !in_range(u.sensor, u.value))
            .count();
        (gaps, non_finite, out_of_range)
    }

    #[test]
    fn every_fault_kind_in_first_minute() {
        for seed in 0..30 {
            let (gaps, non_finite, out_of_range) = fault_kinds(&run(seed, true, 60 * STEPS_PER_S));
            assert!(gaps >= 1, "seed {seed}: no dropout");
            assert!(non_finite >= 1, "seed {seed}: no non-finite value");
            assert!(out_of_range >= 1, "seed {seed}: no out-of-range value");
        }
    }

    #[test]
    fn faults_recur_and_no_faults_when_off() {
        let (gaps, non_finite, out_of_range) = fault_kinds(&run(9, true, TEN_MINUTES));
        assert!((2..=8).contains(&gaps), "{gaps} dropouts");
        assert!((2..=8).contains(&non_finite), "{non_finite} non-finite");
        assert!(
            (2..=8).contains(&out_of_range),
            "{out_of_range} out-of-range"
        );
        assert_eq!(fault_kinds(&run(9, false, TEN_MINUTES)), (0, 0, 0));
    }

    #[test]
    fn faults_only_drop_or_corrupt_the_clean_signal() {
        let clean = run(12, false, TEN_MINUTES);
        let faulty = run(12, true, TEN_MINUTES);
        assert!(faulty.len() < clean.len());
        let mut j = 0;
        let mut corrupted = 0;
        for (_, f) in &faulty {
            // Faulty updates are a subsequence of the clean ones, same instants and sensors.
            while (clean[j].1.at, clean[j].1.sensor) != (f.at, f.sensor) {
                j += 1;
            }
            if f.value.to_bits() != clean[j].1.value.to_bits() {
                assert!(!in_range(f.sensor, f.value), "{f:?} vs {:?}", clean[j].1);
                corrupted += 1;
            }
            j += 1;
        }
        assert!(corrupted >= 4);
    }
}
