//! What the agent says about itself: the status snapshot published on `[status] topic` and
//! written to `[status] file`, the online and offline (last will) messages, and the
//! readable form `redline-agent status` prints.

use crate::ops::stats::{NullReason, Stats};
use crate::spool::SpoolStats;
use serde_json::{Map, Value, json};
use std::path::Path;

/// Who is talking: fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Meta {
    pub vehicle_id: String,
    pub session_id: String,
    pub started_ms: i64,
    pub source: String,
}

fn rfc3339(ms: i64) -> Value {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

fn head(meta: &Meta, state: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("state".into(), state.into());
    m.insert("vehicle_id".into(), meta.vehicle_id.clone().into());
    m.insert("session_id".into(), meta.session_id.clone().into());
    m.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
    m.insert("started_at".into(), rfc3339(meta.started_ms));
    m.insert("source".into(), meta.source.clone().into());
    m
}

/// The retained message published at every connect.
pub fn online(meta: &Meta) -> Vec<u8> {
    let mut m = head(meta, "online");
    m.insert(
        "at".into(),
        rfc3339(crate::ops::clock::wall_now_us() / 1000),
    );
    Value::Object(m).to_string().into_bytes()
}

/// The retained last will (`reason` = "connection lost") or the goodbye at a clean stop.
pub fn offline(meta: &Meta, reason: &str) -> Vec<u8> {
    let mut m = head(meta, "offline");
    m.insert("reason".into(), reason.into());
    Value::Object(m).to_string().into_bytes()
}

/// Every counter, as the periodic status message and the status file carry them.
pub fn snapshot(meta: &Meta, stats: &Stats, spool: Option<&SpoolStats>) -> Value {
    let now_ms = crate::ops::clock::wall_now_us() / 1000;
    let mut m = head(meta, "running");
    m.insert("at".into(), rfc3339(now_ms));
    m.insert("at_ms".into(), now_ms.into());
    m.insert("link".into(), link_json(stats));
    m.insert("counters".into(), counters_json(stats));
    if let Some(s) = spool {
        m.insert("backlog".into(), backlog_json(s, now_ms));
        m.insert("spool".into(), spool_json(s));
        m.insert("losses".into(), losses_json(s));
    }
    Value::Object(m)
}

/// The MQTT link: connected or not, its measured rate and round trip, the last error.
fn link_json(stats: &Stats) -> Value {
    let g = Stats::get;
    let last_ack = g(&stats.last_ack_ms);
    json!({
        "connected": g(&stats.connected) == 1,
        "last_puback_at": if last_ack == 0 { Value::Null } else { rfc3339(last_ack as i64) },
        "reconnects": g(&stats.reconnects),
        "rate_bytes_per_s": g(&stats.link_rate_bps),
        "rtt_ms": g(&stats.link_rtt_ms),
        "queued_bytes": g(&stats.link_queued_bytes),
        "inflight_messages": g(&stats.inflight),
        "window_bytes": g(&stats.link_window_bytes),
        "message_bytes": g(&stats.link_message_bytes),
        "last_error": stats.last_error().map(|(class, detail, at)| json!({
            "class": class, "detail": detail, "at": rfc3339(at)
        })),
    })
}

/// What every stage counted: readings, nulls per field and reason, rejected input, sends.
fn counters_json(stats: &Stats) -> Value {
    let g = Stats::get;
    let mut nulls = Map::new();
    for (i, name) in stats.field_names().iter().enumerate() {
        let mut by = Map::new();
        for r in NullReason::ALL {
            let n = stats.nulls(i, r);
            if n > 0 {
                by.insert(r.name().into(), n.into());
            }
        }
        if !by.is_empty() {
            nulls.insert(name.clone(), Value::Object(by));
        }
    }
    let rejected: Map<String, Value> = stats
        .source_errors()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    json!({
        "readings": g(&stats.readings),
        "ticks_missed": g(&stats.ticks_missed),
        "dropped_readings": g(&stats.readings_dropped),
        "nulls": nulls,
        "lines": g(&stats.lines),
        "frames": g(&stats.frames),
        "rejected": rejected,
        "batches": g(&stats.batches),
        "messages_published": g(&stats.messages_published),
        "bytes_published": g(&stats.bytes_published),
        "pubacks": g(&stats.pubacks),
        "readings_acknowledged": g(&stats.readings_acked),
        "republished": g(&stats.republished),
        "resent_bytes": g(&stats.bytes_resent),
    })
}

/// What waits in the spool for a PUBACK (and for a trusted clock).
fn backlog_json(s: &SpoolStats, now_ms: i64) -> Value {
    let g = Stats::get;
    let oldest = g(&s.oldest_unacked_ms);
    json!({
        "batches": g(&s.unacked_batches),
        "readings": g(&s.unacked_readings),
        "bytes": g(&s.bytes),
        "oldest_at": if oldest == 0 { Value::Null } else { rfc3339(oldest as i64) },
        "age_s": if oldest == 0 { Value::Null } else { ((now_ms - oldest as i64).max(0) / 1000).into() },
        "held_for_clock_batches": g(&s.held_batches),
        "held_for_clock_bytes": g(&s.held_bytes),
    })
}

/// The disk under the spool: while it cannot be written, batches live in memory.
fn spool_json(s: &SpoolStats) -> Value {
    let g = Stats::get;
    let fault = s.fault();
    json!({
        "writable": fault.is_none(),
        "fault": fault.map(|(since, error)| json!({
            "error": error,
            "since": rfc3339(since as i64),
        })),
        "memory_batches": g(&s.memory_batches),
        "memory_bytes": g(&s.memory_bytes),
        "memory_limit_bytes": g(&s.memory_limit_bytes),
        // Batches the spool thread has not taken yet (a hung disk), their bytes
        // (bounded by `memory_limit_bytes`) and the most they have been.
        "queued_batches": g(&s.queued_appends),
        "queued_bytes": g(&s.queued_append_bytes),
        "queued_peak_bytes": g(&s.queued_append_peak_bytes),
        "written_from_memory_batches": g(&s.written_from_memory_batches),
        "read_retries": g(&s.read_retries),
        "read_failures": g(&s.read_failures),
    })
}

/// Readings the agent had to give up, and damage it cut from the spool.
fn losses_json(s: &SpoolStats) -> Value {
    let g = Stats::get;
    json!({
        "dropped_at_cap_readings": g(&s.cap_dropped_readings),
        "dropped_at_cap_held_batches": g(&s.cap_dropped_held_batches),
        "corrupt_cuts": g(&s.corrupt_cuts),
        "corrupt_bytes": g(&s.corrupt_bytes),
        "corrupt_frames": g(&s.corrupt_frames),
        "spool_write_errors": g(&s.write_errors),
        "dropped_from_memory_readings": g(&s.memory_dropped_readings),
        "dropped_from_memory_batches": g(&s.memory_dropped_batches),
    })
}

/// Writes the snapshot atomically: a reader never sees half a file.
pub fn write_file(path: &Path, snapshot: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
    text.push(b'\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The status file in words, for `redline-agent status`.
pub fn render(v: &Value, file_age_s: Option<u64>) -> String {
    let s = |p: &str| text_at(v, p);
    let mut out = String::new();
    out.push_str(&format!(
        "vehicle {} · session {} · agent {} · running since {} · source {}\n",
        s("/vehicle_id"),
        s("/session_id"),
        s("/agent_version"),
        s("/started_at"),
        s("/source")
    ));
    if let Some(age) = file_age_s {
        out.push_str(&format!("snapshot taken {} ({age} s ago)\n", s("/at")));
    }
    render_link(v, &mut out);
    render_backlog(v, &mut out);
    render_spool(v, &mut out);
    render_counters(v, &mut out);
    out
}

/// The `link:` lines: connection, last PUBACK, what the link model measures, last error.
fn render_link(v: &Value, out: &mut String) {
    let s = |p: &str| text_at(v, p);
    let n = |p: &str| num_at(v, p);
    let connected = v
        .pointer("/link/connected")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    out.push_str(&format!(
        "link:     {} · last PUBACK {} · {} reconnect(s)\n",
        if connected {
            "CONNECTED"
        } else {
            "NOT CONNECTED"
        },
        s("/link/last_puback_at"),
        n("/link/reconnects")
    ));
    out.push_str(&format!(
        "          measured {} B/s, round trip {} ms · {} byte(s) in flight ({} message(s)), window {} · backlog messages of {} bytes\n",
        n("/link/rate_bytes_per_s"),
        n("/link/rtt_ms"),
        n("/link/queued_bytes"),
        n("/link/inflight_messages"),
        n("/link/window_bytes"),
        n("/link/message_bytes")
    ));
    if let Some(e) = v.pointer("/link/last_error").filter(|e| !e.is_null()) {
        out.push_str(&format!(
            "          last error ({}) at {}: {}\n",
            e["class"].as_str().unwrap_or("-"),
            e["at"].as_str().unwrap_or("-"),
            e["detail"].as_str().unwrap_or("-")
        ));
    }
}

/// The `backlog:` line: what waits for a PUBACK, and what waits for a trusted clock.
fn render_backlog(v: &Value, out: &mut String) {
    let s = |p: &str| text_at(v, p);
    let n = |p: &str| num_at(v, p);
    if v.get("backlog").is_some() {
        out.push_str(&format!(
            "backlog:  {} batch(es), {} reading(s), {} bytes · oldest {} ({} s)",
            n("/backlog/batches"),
            n("/backlog/readings"),
            n("/backlog/bytes"),
            s("/backlog/oldest_at"),
            v.pointer("/backlog/age_s")
                .and_then(Value::as_u64)
                .map_or("-".into(), |a| a.to_string())
        ));
        let held = n("/backlog/held_for_clock_batches");
        if held > 0 {
            out.push_str(&format!(" · {held} held until the clock is trusted"));
        }
        out.push('\n');
    }
}

/// The `spool:` line, only when the disk fails or batches wait in memory.
fn render_spool(v: &Value, out: &mut String) {
    let s = |p: &str| text_at(v, p);
    let n = |p: &str| num_at(v, p);
    if let Some(sp) = v.get("spool") {
        let memory = format!(
            "{} batch(es), {} bytes in memory (bound {} bytes)",
            n("/spool/memory_batches"),
            n("/spool/memory_bytes"),
            n("/spool/memory_limit_bytes")
        );
        if sp.get("writable").and_then(Value::as_bool) == Some(false) {
            out.push_str(&format!(
                "spool:    NOT WRITABLE since {} ({}): readings kept in memory and published; {memory}\n",
                s("/spool/fault/since"),
                s("/spool/fault/error"),
            ));
        } else if n("/spool/memory_batches") > 0 {
            out.push_str(&format!("spool:    writable; {memory}\n"));
        }
        if n("/spool/queued_batches") > 0 {
            out.push_str(&format!(
                "          {} batch(es), {} bytes waiting for the spool thread (a hung disk?)\n",
                n("/spool/queued_batches"),
                n("/spool/queued_bytes")
            ));
        }
    }
}

/// The `sent:`, `readings:`, `nulls:`, `rejected:` and `losses:` lines.
fn render_counters(v: &Value, out: &mut String) {
    let n = |p: &str| num_at(v, p);
    out.push_str(&format!(
        "sent:     {} message(s), {} bytes, {} reading(s) acknowledged\n",
        n("/counters/messages_published"),
        n("/counters/bytes_published"),
        n("/counters/readings_acknowledged")
    ));
    out.push_str(&format!(
        "readings: {} ({} tick(s) missed)\n",
        n("/counters/readings"),
        n("/counters/ticks_missed")
    ));
    for (key, label) in [
        ("/counters/nulls", "nulls:    "),
        ("/counters/rejected", "rejected: "),
    ] {
        if let Some(map) = v
            .pointer(key)
            .and_then(Value::as_object)
            .filter(|m| !m.is_empty())
        {
            out.push_str(label);
            out.push_str(&serde_json::to_string(map).unwrap_or_default());
            out.push('\n');
        }
    }
    if let Some(l) = v.get("losses") {
        out.push_str(&format!("losses:   {l}\n"));
    }
}

/// The string at JSON pointer `p`, or "-".
fn text_at(v: &Value, p: &str) -> String {
    v.pointer(p)
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_string()
}

/// The number at JSON pointer `p`, or 0.
fn num_at(v: &Value, p: &str) -> u64 {
    v.pointer(p).and_then(Value::as_u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_render_show_a_spool_fault() {
        let meta = Meta {
            vehicle_id: "GT3".into(),
            session_id: "s".into(),
            started_ms: 1_705_267_200_000,
            source: "simulator".into(),
        };
        let stats = Stats::new(vec!["engine_rpm".into()]);
        let spool = SpoolStats::default();
        let ok = snapshot(&meta, &stats, Some(&spool));
        assert_eq!(ok["spool"]["writable"], true);
        assert!(ok["spool"]["fault"].is_null());
        assert!(!render(&ok, None).contains("NOT WRITABLE"));

        spool.set_fault(Some("No space left on device (os error 28)"));
        spool
            .memory_batches
            .store(3, std::sync::atomic::Ordering::Relaxed);
        spool
            .memory_dropped_readings
            .store(20, std::sync::atomic::Ordering::Relaxed);
        let v = snapshot(&meta, &stats, Some(&spool));
        assert_eq!(v["spool"]["writable"], false);
        assert_eq!(
            v["spool"]["fault"]["error"],
            "No space left on device (os error 28)"
        );
        assert_eq!(v["spool"]["memory_batches"], 3);
        assert_eq!(v["losses"]["dropped_from_memory_readings"], 20);
        let text = render(&v, None);
        assert!(
            text.contains("spool:    NOT WRITABLE since ")
                && text.contains("(No space left on device (os error 28))")
                && text.contains("3 batch(es)"),
            "{text}"
        );
    }
}
