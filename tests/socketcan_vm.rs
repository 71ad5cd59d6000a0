//! The CAN source on a real SocketCAN bus: `scripts/vcan-vm.sh` boots Debian's stock kernel
//! in QEMU (this machine's kernel may have no CAN), creates `vcan0` there and runs the
//! agent binary inside with a guest script. Three phases, one VM:
//!
//! 1. readings: `cansend` frames with known values, unbound ids as noise and one too-short
//!    frame; the records carry exactly those values while fresh, the summary counts the
//!    bound frames only and `too_short=1`;
//! 2. recovery: `vcan0` goes down and up, then is deleted and re-created; the agent logs
//!    the loss and `back after`, the fields are null in between, readings resume, exit 0;
//! 3. bench: `simulate --can vcan0` feeds the agent plausible values.
//!
//! Needs root on Debian 12 the first time (the script downloads qemu and the kernel into
//! `target/vcan-vm`, or `$VCAN_VM_DIR`); it never skips: without them it fails and says
//! how to get them. The guest prints everything between `=== VCAN-...` markers on the
//! console; the full console of the last run is kept in the cache directory.

use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The values the guest puts on the bus and their frames (checked against cantools).
const DISC_FL: f64 = 652.3;
const DISC_FR: f64 = 648.1;
const RPM: i64 = 7850;
const OIL_TEMP: f64 = 105.2;
/// BrakeTemps 0x300: DiscFL 0|16 LE (0.1,-40) raw 6923 = 0x1B0B, DiscFR raw 6881 = 0x1AE1,
/// DiscRL/RR 0.0 (raw 400).
const FRAME_BRAKES: &str = "300#0B1BE11A90019001";
/// Engine 0x100: RPM 7|16@0+ (Motorola): 7850 = 0x1EAA in bytes 0-1.
const FRAME_ENGINE: &str = "100#1EAA000000000000";
/// EngineTemps 0x101: OilTemp 0|16 LE (0.1,-40): raw 1452 = 0x05AC.
const FRAME_OIL: &str = "101#AC05000000000000";
/// A BrakeTemps frame of one byte: counted as `too_short`.
const FRAME_SHORT: &str = "300#0B";
/// Rounds of the three frames in the readings phase.
const ROUNDS: u64 = 12;

const FIELDS: [&str; 4] = [
    "brake_disc_temp_fl",
    "brake_disc_temp_fr",
    "engine_rpm",
    "engine_oil_temp",
];

const CONFIG: &str = r#"[vehicle]
id = "GT3-CAN"
session_id = "s"

[source]
kind = "can"
interface = "vcan0"
dbc = "/files/redline-gt3.dbc"

[source.signals]
brake_disc_temp_fl = "BrakeTemps.DiscFL"
brake_disc_temp_fr = "BrakeTemps.DiscFR"
engine_rpm = "Engine.RPM"
engine_oil_temp = "EngineTemps.OilTemp"
"#;

/// Runs in the VM (busybox sh, cwd /files, vcan0 up). Times are the guest's wall clock in
/// ms (busybox `date` has no %N; `adjtimex` has microseconds), the clock of the records.
const GUEST: &str = r#"set -u
now_ms() { adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf "%.0f\n", s * 1000 + int(u / 1000)}'; }
event() { echo "=== VCAN-EVENT $1 $(now_ms)"; }
section() { echo "=== VCAN-BEGIN $1"; cat "$2"; echo "=== VCAN-END $1"; }
send_values() { cansend vcan0 $BRAKES; cansend vcan0 $ENGINE; cansend vcan0 $OIL; }
start_agent() {
  redline-agent run --config /files/can.toml --stdout > /tmp/$1.out 2> /tmp/$1.err &
  AGENT=$!
  i=0
  until grep -q 'reading CAN interface' /tmp/$1.err; do
    i=$((i + 1))
    if [ $i -gt 300 ] || ! kill -0 $AGENT 2>/dev/null; then
      echo "=== VCAN-NOTE $1: the agent did not log 'reading CAN interface'"; break
    fi
    usleep 50000
  done
  event $1-ready
}
stop_agent() {
  event $1-sigterm
  kill -TERM $AGENT
  (sleep 10; kill -KILL $AGENT 2>/dev/null) & watchdog=$!
  wait $AGENT; rc=$?
  kill $watchdog 2>/dev/null
  echo "=== VCAN-RC $1 $rc"
  section $1.stdout /tmp/$1.out
  section $1.stderr /tmp/$1.err
}

# 1. Readings: the bound frames, unbound noise (0x7FF, 0x301, extended 0x300), one
#    too-short BrakeTemps frame.
start_agent readings
# The bus's own record of every frame, with the kernel's receive time (wall clock, µs):
# what the readings are checked against, whatever the speed of this VM.
candump -L vcan0 > /tmp/readings.bus & dump=$!
usleep 200000
cangen vcan0 -I 7FF -L 8 -n 200 -g 5 & noise=$!
event readings-start
n=0
while [ $n -lt $ROUNDS ]; do
  send_values
  if [ $n = 2 ]; then cansend vcan0 00000300#FFFFFFFFFFFFFFFF; cansend vcan0 301#FFFFFFFFFFFFFFFF; fi
  if [ $n = 6 ]; then cansend vcan0 $SHORT; fi
  usleep 50000
  n=$((n + 1))
done
event readings-end
wait $noise
sleep 1
kill -TERM $dump; wait $dump
section readings.bus /tmp/readings.bus
stop_agent readings

# 2. Recovery: link down and up, then the interface deleted and re-created, while a
#    sender keeps putting the values on the bus whenever it can.
start_agent recovery
(while [ ! -f /tmp/stop-sender ]; do send_values 2>/dev/null; usleep 50000; done) & sender=$!
sleep 1.5
event recovery-down; ip link set vcan0 down
sleep 1.5
event recovery-up; ip link set vcan0 up
sleep 2
event recovery-del; ip link del vcan0
sleep 1.5
event recovery-add; ip link add dev vcan0 type vcan && ip link set up vcan0
sleep 3
touch /tmp/stop-sender; wait $sender
event recovery-end
sleep 1
stop_agent recovery

# 3. Bench emitter: the simulated car's frames on vcan0.
start_agent bench
event bench-start
redline-agent simulate --can vcan0 --duration 3s --speed 1 2> /tmp/simulate.err
echo "=== VCAN-RC simulate $?"
event bench-end
section simulate.stderr /tmp/simulate.err
usleep 300000
stop_agent bench
"#;

/// What the guest printed between markers.
#[derive(Default)]
struct Console {
    sections: HashMap<String, Vec<String>>,
    events: HashMap<String, i64>,
    rcs: HashMap<String, i32>,
    notes: Vec<String>,
}

impl Console {
    fn parse(text: &str) -> Self {
        let mut c = Console::default();
        let mut open: Option<(String, Vec<String>)> = None;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(rest) = line.strip_prefix("=== VCAN-END ") {
                if let Some((name, lines)) = open.take()
                    && name == rest.trim()
                {
                    c.sections.insert(name, lines);
                }
                continue;
            }
            if let Some((_, lines)) = open.as_mut() {
                lines.push(line.to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("=== VCAN-BEGIN ") {
                open = Some((rest.trim().to_string(), Vec::new()));
            } else if let Some(rest) = line.strip_prefix("=== VCAN-EVENT ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(Ok(ms))) = (it.next(), it.next().map(str::parse)) {
                    c.events.insert(name.to_string(), ms);
                }
            } else if let Some(rest) = line.strip_prefix("=== VCAN-RC ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(Ok(rc))) = (it.next(), it.next().map(str::parse)) {
                    c.rcs.insert(name.to_string(), rc);
                }
            } else if let Some(rest) = line.strip_prefix("=== VCAN-NOTE ") {
                c.notes.push(rest.to_string());
            }
        }
        c
    }

    fn section(&self, name: &str) -> &[String] {
        self.sections.get(name).map_or(&[], Vec::as_slice)
    }

    fn event(&self, name: &str, problems: &mut Vec<String>) -> Option<i64> {
        let t = self.events.get(name).copied();
        if t.is_none() {
            problems.push(format!("the guest did not reach event `{name}`"));
        }
        t
    }
}

/// One record's fields: `None` = null. Integers stay integers.
struct Record {
    ts: i64,
    fields: [Option<Value>; 4],
}

impl Record {
    fn all_fresh(&self) -> bool {
        self.fields.iter().all(Option::is_some)
    }
    fn all_null(&self) -> bool {
        self.fields.iter().all(Option::is_none)
    }
    fn show(&self) -> String {
        let v: Vec<String> = self
            .fields
            .iter()
            .map(|f| f.as_ref().map_or("null".into(), Value::to_string))
            .collect();
        format!("{} [{}]", self.ts, v.join(", "))
    }
}

/// Parses the `{"records":[...]}` lines of an agent's stdout, checking the record shape.
fn records(phase: &str, lines: &[String], problems: &mut Vec<String>) -> Vec<Record> {
    let mut out = Vec::new();
    for line in lines.iter().filter(|l| !l.trim().is_empty()) {
        let batch: Map<String, Value> = match serde_json::from_str(line) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!(
                    "{phase}: stdout line is not a JSON batch ({e}): {line}"
                ));
                continue;
            }
        };
        let Some(Value::Array(recs)) = batch.get("records") else {
            problems.push(format!("{phase}: batch without \"records\": {line}"));
            continue;
        };
        for r in recs {
            let Some(obj) = r.as_object() else {
                problems.push(format!("{phase}: record is not an object: {r}"));
                continue;
            };
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            let mut want = vec!["vehicle_id", "timestamp", "session_id"];
            want.extend(FIELDS);
            want.sort_unstable();
            if keys != want || obj["vehicle_id"] != "GT3-CAN" || obj["session_id"] != "s" {
                problems.push(format!("{phase}: unexpected record shape: {r}"));
                continue;
            }
            let Some(ts) = obj["timestamp"].as_i64() else {
                problems.push(format!("{phase}: timestamp is not an integer: {r}"));
                continue;
            };
            let fields = FIELDS.map(|f| Some(obj[f].clone()).filter(|v| !v.is_null()));
            out.push(Record { ts, fields });
        }
    }
    if out.is_empty() {
        problems.push(format!("{phase}: the agent printed no records"));
    }
    out
}

/// Every non-null field carries exactly the value sent (rpm as a JSON integer).
fn check_exact(phase: &str, recs: &[Record], problems: &mut Vec<String>) {
    let want = [
        Value::from(DISC_FL),
        Value::from(DISC_FR),
        Value::from(RPM),
        Value::from(OIL_TEMP),
    ];
    let bad: Vec<String> = recs
        .iter()
        .filter(|r| {
            r.fields
                .iter()
                .zip(&want)
                .any(|(f, w)| f.as_ref().is_some_and(|v| v != w))
        })
        .map(Record::show)
        .collect();
    if !bad.is_empty() {
        problems.push(format!(
            "{phase}: records with values other than the ones sent \
             (fl {DISC_FL}, fr {DISC_FR}, rpm {RPM}, oil {OIL_TEMP}): {}",
            head(&bad)
        ));
    }
}

fn head(items: &[String]) -> String {
    let mut s = items.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > 5 {
        s.push_str(&format!("; ... ({} in all)", items.len()));
    }
    s
}

/// The agent's `summary:` line: `frames=N` and the `rejected:` counts.
fn summary(
    phase: &str,
    stderr: &[String],
    problems: &mut Vec<String>,
) -> Option<(u64, BTreeMap<String, u64>)> {
    let Some(line) = stderr.iter().rev().find(|l| l.contains("summary:")) else {
        problems.push(format!(
            "{phase}: no `summary:` line on stderr after SIGTERM"
        ));
        return None;
    };
    let frames = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("frames="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut rejected = BTreeMap::new();
    if let Some((_, rest)) = line.split_once("rejected:") {
        for w in rest.split_whitespace() {
            if let Some((k, v)) = w.split_once('=')
                && let Ok(n) = v.parse()
            {
                rejected.insert(k.to_string(), n);
            }
        }
    }
    Some((frames, rejected))
}

/// Epoch ms of a log line's leading RFC 3339 UTC time (`2026-01-02T03:04:05.678901Z`).
fn log_time(line: &str) -> Option<i64> {
    let t = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if d.len() != 3 || h.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant).
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    Some(((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + ms)
}

/// Log lines (with their time) that contain any of `needles`.
fn logged(stderr: &[String], needles: &[&str]) -> Vec<(i64, String)> {
    stderr
        .iter()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .filter_map(|l| Some((log_time(l)?, l.clone())))
        .collect()
}

fn check_rc(console: &Console, name: &str, problems: &mut Vec<String>) {
    match console.rcs.get(name) {
        Some(0) => {}
        Some(rc) => problems.push(format!("{name}: exit status {rc}, expected 0 (SIGTERM)")),
        None => problems.push(format!("{name}: the guest printed no exit status")),
    }
}

/// The message of each field (BrakeTemps, Engine, EngineTemps), as candump prints its id.
const FIELD_IDS: [&str; 4] = ["300", "300", "100", "101"];
/// How long after a frame is on the bus the agent may take to read it (a slow VM on a
/// loaded host), and after its tick to sample (one period, and a preempted thread).
const READ_LAG_MS: i64 = 250;
const SAMPLE_LAG_MS: i64 = 250;
/// `sampling.stale_after` (the default).
const STALE_MS: i64 = 500;

/// Bus times (ms, the kernel's receive time) of the full 8-byte frames of each bound id in a
/// `candump -L` log: `(1705267200.123456) vcan0 300#0B1BE11A90019001`.
fn bus_frames(lines: &[String]) -> HashMap<String, Vec<i64>> {
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for l in lines {
        let mut it = l.split_whitespace();
        let (Some(t), Some(_), Some(frame)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Some((id, data)) = frame.split_once('#') else {
            continue;
        };
        let Some((sec, usec)) = t
            .strip_prefix('(')
            .and_then(|t| t.strip_suffix(')'))
            .and_then(|t| t.split_once('.'))
        else {
            continue;
        };
        let (Ok(sec), Ok(usec)) = (sec.parse::<i64>(), usec.parse::<i64>()) else {
            continue;
        };
        if FIELD_IDS.contains(&id) && data.len() == 16 {
            out.entry(id.to_string())
                .or_default()
                .push(sec * 1000 + usec / 1000);
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

fn check_readings(console: &Console, problems: &mut Vec<String>) {
    let p = "readings";
    check_rc(console, p, problems);
    let recs = records(p, console.section("readings.stdout"), problems);
    check_exact(p, &recs, problems);
    // Against the bus's own times: a field must carry its value when a frame of its
    // message was on the bus long enough before the tick to be read and recently enough
    // to be fresh; and must be null when its last frame (even one read late) is stale.
    let bus = bus_frames(console.section("readings.bus"));
    if FIELD_IDS
        .iter()
        .any(|id| bus.get(*id).is_none_or(Vec::is_empty))
    {
        problems.push(format!(
            "{p}: candump saw no frame of some bound id: {:?}",
            bus.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
        ));
        return;
    }
    let (mut must_fresh, mut missing, mut late) = (0, Vec::new(), Vec::new());
    let (mut fresh_per_field, mut null_per_field) = ([0usize; 4], [0usize; 4]);
    for r in &recs {
        let mut all = true;
        for (f, id) in FIELD_IDS.iter().enumerate() {
            let frames = &bus[*id];
            // A frame read by the tick and at most 450 ms old then (50 ms for rounding).
            let fresh = frames
                .iter()
                .any(|t| (r.ts - (STALE_MS - 50)..=r.ts - READ_LAG_MS).contains(t));
            let stale = frames
                .iter()
                .filter(|t| **t <= r.ts + SAMPLE_LAG_MS)
                .all(|t| *t < r.ts - STALE_MS - READ_LAG_MS);
            all &= fresh;
            fresh_per_field[f] += usize::from(fresh);
            // Stale after having had a value (before the first frame it is merely missing).
            null_per_field[f] += usize::from(stale && frames.first().is_some_and(|t| *t <= r.ts));
            if fresh && r.fields[f].is_none() {
                missing.push(format!("{} at {}", FIELDS[f], r.show()));
            }
            if stale && r.fields[f].is_some() {
                late.push(format!("{} at {}", FIELDS[f], r.show()));
            }
        }
        must_fresh += usize::from(all);
    }
    if !missing.is_empty() {
        problems.push(format!(
            "{p}: fields null although a frame of theirs was on the bus {READ_LAG_MS}..{} ms \
             before: {}",
            STALE_MS - 50,
            head(&missing)
        ));
    }
    if !late.is_empty() {
        problems.push(format!(
            "{p}: values present although their last frame was more than {} ms old: {}",
            STALE_MS + READ_LAG_MS,
            head(&late)
        ));
    }
    eprintln!(
        "{p}: {} records; demanded fresh per field {fresh_per_field:?}, stale (null) per field \
         {null_per_field:?}, all four fresh in {must_fresh}; frames per id {:?}",
        recs.len(),
        bus.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
    );
    // Something to check on both sides, for every field, whatever the speed of the VM.
    if fresh_per_field.iter().any(|n| *n < 3) || null_per_field.iter().any(|n| *n < 1) {
        problems.push(format!(
            "{p}: the bus times demand too little: records demanded fresh per field \
             {fresh_per_field:?} (want 3 each), stale per field {null_per_field:?} (want 1 each); \
             frames per id {:?}",
            bus.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
        ));
    }
    if let Some((frames, rejected)) = summary(p, console.section("readings.stderr"), problems) {
        let want = ROUNDS * 3 + 1;
        if frames != want {
            problems.push(format!(
                "{p}: summary frames={frames}, expected {want} ({ROUNDS} x 3 bound frames + 1 \
                 too short); the noise (200 frames of 0x7FF, one of 0x301, one extended \
                 0x00000300) must be filtered in the kernel"
            ));
        }
        let want_rej = BTreeMap::from([("too_short".to_string(), 1)]);
        if rejected != want_rej {
            problems.push(format!(
                "{p}: summary rejected {rejected:?}, expected exactly too_short=1"
            ));
        }
    }
}

fn check_recovery(console: &Console, problems: &mut Vec<String>) {
    let p = "recovery";
    check_rc(console, p, problems);
    let stderr = console.section("recovery.stderr");
    let recs = records(p, console.section("recovery.stdout"), problems);
    check_exact(p, &recs, problems);
    let ev =
        |name: &str, problems: &mut Vec<String>| console.event(&format!("{p}-{name}"), problems);
    let (Some(ready), Some(down), Some(up), Some(del), Some(add), Some(end), Some(term)) = (
        ev("ready", problems),
        ev("down", problems),
        ev("up", problems),
        ev("del", problems),
        ev("add", problems),
        ev("end", problems),
        ev("sigterm", problems),
    ) else {
        return;
    };
    let losses = logged(
        stderr,
        &[
            "CAN interface vcan0 lost (",
            "CAN interface vcan0 unavailable (",
        ],
    );
    let backs = logged(stderr, &["CAN interface vcan0 back after "]);
    let rel = |lines: &[(i64, String)]| -> String {
        if lines.is_empty() {
            return "none".into();
        }
        lines
            .iter()
            .map(|(t, l)| format!("[{:+} ms from ready] {}", t - ready, l))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let timeline = format!(
        "{p}: timeline, ms after the agent was ready: link down {:+}, up {:+}, deleted {:+}, \
         re-created {:+}, SIGTERM {:+}; loss logged: {}; back logged: {}",
        down - ready,
        up - ready,
        del - ready,
        add - ready,
        term - ready,
        rel(&losses),
        rel(&backs)
    );
    let mut found = Vec::new();
    for (what, undo, from, to, next) in [
        ("`ip link set vcan0 down`", "up again", down, up, del),
        ("`ip link del vcan0`", "re-created", del, add, term),
    ] {
        if !losses.iter().any(|(t, _)| (from..to).contains(t)) {
            found.push(format!(
                "{p}: after {what} the agent logged no `lost (...)`/`unavailable (...)` \
                 while the interface was gone"
            ));
        }
        if backs.iter().any(|(t, _)| (from..to).contains(t)) {
            found.push(format!(
                "{p}: after {what} the agent logged `back after` while the interface was \
                 still gone"
            ));
        }
        if !backs.iter().any(|(t, _)| (to..next).contains(t)) {
            found.push(format!(
                "{p}: no `back after` logged once vcan0 was {undo} after {what}"
            ));
        }
        let stale: Vec<String> = recs
            .iter()
            .filter(|r| r.ts >= from + 600 && r.ts <= to && !r.all_null())
            .map(Record::show)
            .collect();
        if !stale.is_empty() {
            found.push(format!(
                "{p}: values while the interface was gone after {what} (no frame can \
                 arrive; fields must be null 500 ms after the loss): {}",
                head(&stale)
            ));
        }
        let until = next.min(end);
        let resumed = recs
            .iter()
            .filter(|r| r.ts > to && r.ts < until && r.all_fresh())
            .count();
        if resumed < 3 {
            found.push(format!(
                "{p}: readings did not resume once vcan0 was {undo} after {what}: \
                 {resumed} record(s) with all four values in the {} ms after it while the \
                 sender kept sending, expected at least 3",
                until - to
            ));
        }
    }
    if !recs.iter().any(|r| r.ts < down && r.all_fresh()) {
        found.push(format!("{p}: no readings before the link went down"));
    }
    if !recs.iter().any(|r| r.ts >= term - 200) {
        found.push(format!(
            "{p}: the records stop before SIGTERM (last at {:?}, SIGTERM at {term}): the \
             agent did not keep sampling",
            recs.last().map(|r| r.ts)
        ));
    }
    if !found.is_empty() {
        found.push(timeline);
    }
    problems.append(&mut found);
    summary(p, stderr, problems);
}

fn check_bench(console: &Console, problems: &mut Vec<String>) {
    let p = "bench";
    check_rc(console, "simulate", problems);
    check_rc(console, p, problems);
    let recs = records(p, console.section("bench.stdout"), problems);
    let ranges = [
        (-40.0, 1400.0),
        (-40.0, 1400.0),
        (0.0, 20000.0),
        (-40.0, 1400.0),
    ];
    let mut bad = Vec::new();
    for r in &recs {
        for ((f, &(lo, hi)), name) in r.fields.iter().zip(&ranges).zip(FIELDS) {
            let Some(v) = f else { continue };
            let ok = match v.as_f64() {
                Some(x) => (lo..=hi).contains(&x) && (name != "engine_rpm" || v.is_i64()),
                None => false,
            };
            if !ok {
                bad.push(format!("{name}={v} at {}", r.ts));
            }
        }
    }
    if !bad.is_empty() {
        problems.push(format!("{p}: implausible values: {}", head(&bad)));
    }
    let fresh: Vec<&Record> = recs.iter().filter(|r| r.all_fresh()).collect();
    if fresh.len() < 15 {
        problems.push(format!(
            "{p}: only {} record(s) with all four values during `simulate --can vcan0 \
             --duration 3s`, expected at least 15",
            fresh.len()
        ));
    }
    let rpms: std::collections::BTreeSet<String> = fresh
        .iter()
        .map(|r| {
            r.fields[2]
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default()
        })
        .collect();
    if fresh.len() >= 15 && rpms.len() < 2 {
        problems.push(format!("{p}: the simulated rpm never changes ({rpms:?})"));
    }
    let sent = console.section("simulate.stderr").iter().find_map(|l| {
        let rest = l.split_once("sent ")?.1;
        let (n, tail) = rest.split_once(' ')?;
        tail.starts_with("frame(s) on vcan0")
            .then(|| n.parse::<u64>().ok())?
    });
    let Some(sent) = sent else {
        problems.push(format!(
            "{p}: `simulate --can` logged no `sent N frame(s) on vcan0`: {:?}",
            console.section("simulate.stderr")
        ));
        return;
    };
    if let Some((frames, rejected)) = summary(p, console.section("bench.stderr"), problems) {
        if frames != sent {
            problems.push(format!(
                "{p}: the agent counted frames={frames}, the simulator sent {sent} (all of \
                 bound ids)"
            ));
        }
        if !rejected.is_empty() {
            problems.push(format!(
                "{p}: frames of the simulated car rejected: {rejected:?}"
            ));
        }
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("VCAN_VM_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vcan-vm"),
        PathBuf::from,
    )
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| {
            let l = l.trim_end_matches('\r');
            match l.char_indices().nth(240) {
                Some((i, _)) => format!("{}...", &l[..i]),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn can_source_on_real_socketcan_in_a_vm() {
    let started = Instant::now();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let files = dir.path();
    let guest = format!(
        "BRAKES={FRAME_BRAKES}; ENGINE={FRAME_ENGINE}; OIL={FRAME_OIL}; SHORT={FRAME_SHORT}; \
         ROUNDS={ROUNDS}\n{GUEST}"
    );
    std::fs::write(files.join("guest.sh"), guest).expect("write guest.sh");
    std::fs::write(files.join("can.toml"), CONFIG).expect("write can.toml");
    std::fs::copy(
        manifest.join("config/redline-gt3.dbc"),
        files.join("redline-gt3.dbc"),
    )
    .expect("copy the DBC");
    let agent = env!("CARGO_BIN_EXE_redline-agent");

    let cache = cache_dir();
    let out = Command::new("bash")
        .arg(manifest.join("scripts/vcan-vm.sh"))
        .arg("-g")
        .arg(files.join("guest.sh"))
        .arg(agent)
        .arg(files.join("can.toml"))
        .arg(files.join("redline-gt3.dbc"))
        .env("VCAN_VM_DIR", &cache)
        .env(
            "VM_TIMEOUT",
            std::env::var("VM_TIMEOUT").unwrap_or_else(|_| "120".into()),
        )
        .output()
        .expect("cannot run bash scripts/vcan-vm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    let kept = cache.join("last-console.log");
    let _ = std::fs::write(&kept, stdout.as_bytes());
    eprintln!(
        "vcan-vm: exit {code:?} after {:.1} s; console in {}",
        started.elapsed().as_secs_f64(),
        kept.display()
    );
    match code {
        Some(2) => panic!(
            "the QEMU VM with a CAN-enabled kernel cannot be set up; this test needs it \
             (it never skips).\n{}",
            tail(&stderr, 40)
        ),
        Some(124) => panic!(
            "the VM timed out (VM_TIMEOUT, default 120 s)\nconsole tail:\n{}",
            tail(&stdout, 60)
        ),
        _ => {}
    }

    let console = Console::parse(&stdout);
    let mut problems = Vec::new();
    if !stdout.contains("CAN-UTILS: PASS") {
        problems.push("vcan0 does not work in the VM (candump/cangen check)".to_string());
    }
    for note in &console.notes {
        problems.push(note.clone());
    }
    check_readings(&console, &mut problems);
    check_recovery(&console, &mut problems);
    check_bench(&console, &mut problems);
    if problems.is_empty() && code != Some(0) {
        problems.push(format!("scripts/vcan-vm.sh failed with exit {code:?}"));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the agent on a real SocketCAN bus:\n- {}\n\n\
         console tail (full console: {}):\n{}\n\nscript stderr tail:\n{}",
        problems.len(),
        problems.join("\n- "),
        kept.display(),
        tail(&stdout, 60),
        tail(&stderr, 15)
    );
}
