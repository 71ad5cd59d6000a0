#!/usr/bin/env python3
"""Random CAN frames encoded and decoded by cantools: the reference for our DBC decoder.

For N frames: pick a message of the DBC, a random raw value for each of its signals (over
the signal's whole raw range, edges included; for a multiplexed message, a multiplexor
value and only its signals), encode the physical values with cantools, and write

  LOG       the frames as a `candump -L` log (CAN FD `##` for payloads above 8 bytes)
  EXPECTED  one JSON object per frame: what cantools decodes back from those bytes,
            {"line": n, "message": name, "signals": {name: value}, "f64_bits": {name: bits}}
            `line` is the 1-based log line; `f64_bits` gives the exact IEEE bits of every
            float value (so no JSON float parsing stands between the two decoders).

Usage: cantools_vectors.py DBC SEED N LOG EXPECTED
Needs: pip install cantools
"""

import json
import random
import struct
import sys

import cantools


def raw_range(signal):
    if signal.is_signed:
        return -(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1
    return 0, (1 << signal.length) - 1


def random_float(rng, bits):
    """Any finite value of the float type: random bit patterns cover every exponent."""
    special = [0.0, -0.0, 1.0, -1.0, 1.5e-45 if bits == 32 else 5e-324]
    if rng.random() < 0.1:
        return rng.choice(special)
    fmt, raw_fmt = ("<f", "<I") if bits == 32 else ("<d", "<Q")
    while True:
        value = struct.unpack(fmt, struct.pack(raw_fmt, rng.getrandbits(bits)))[0]
        if value == value and abs(value) != float("inf"):
            return value


def random_raw(rng, signal):
    if signal.is_float:
        return random_float(rng, signal.length)
    lo, hi = raw_range(signal)
    edges = [lo, hi, 0, min(hi, 1), max(lo, -1)]
    if rng.random() < 0.2:
        return rng.choice(edges)
    if rng.random() < 0.3:  # small magnitudes, where most real values are
        return rng.randint(max(lo, -1000), min(hi, 1000))
    return rng.randint(lo, hi)


def physical(signal, raw):
    return signal.conversion.raw_to_scaled(raw, decode_choices=False)


def pick_signals(rng, message):
    """The signals a frame of `message` carries, with the multiplexor's value chosen."""
    mux = [s for s in message.signals if s.is_multiplexer]
    if len(mux) > 1:
        raise SystemExit(f"{message.name}: only simple multiplexing is supported")
    if not mux:
        return message.signals, {}
    mux_values = sorted({v for s in message.signals for v in (s.multiplexer_ids or [])})
    chosen = rng.choice(mux_values)
    carried = [
        s for s in message.signals
        if not s.is_multiplexer and (s.multiplexer_ids is None or chosen in s.multiplexer_ids)
    ]
    return carried, {mux[0].name: physical(mux[0], chosen)}


def frame(rng, message):
    signals, values = pick_signals(rng, message)
    for _ in range(100):
        values = dict(values)
        for s in signals:
            values[s.name] = physical(s, random_raw(rng, s))
        try:
            # strict=False: the whole raw range, not only the DBC's [min|max].
            return message.encode(values, scaling=True, strict=False)
        except (cantools.database.EncodeError, OverflowError, ValueError):
            continue  # e.g. a scaled float that no longer fits the float type
    raise SystemExit(f"{message.name}: could not encode random values")


def log_line(time_us, interface, message, data):
    if message.is_extended_frame:
        can_id = f"{message.frame_id:08X}"
    else:
        can_id = f"{message.frame_id:03X}"
    if len(data) > 8 or message.is_fd:
        body = f"#{1 if time_us % 2 else 0:X}{data.hex().upper()}"
    else:
        body = data.hex().upper()
    return f"({time_us // 1_000_000}.{time_us % 1_000_000:06d}) {interface} {can_id}#{body}\n"


def main():
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    dbc_path, seed, count, log_path, expected_path = sys.argv[1:]
    rng = random.Random(int(seed))
    db = cantools.database.load_file(dbc_path)
    messages = sorted(db.messages, key=lambda m: m.name)
    time_us = 1_700_000_000_000_000 + int(seed) * 1_000_003
    with open(log_path, "w") as log, open(expected_path, "w") as expected:
        for n in range(1, int(count) + 1):
            message = rng.choice(messages)
            data = frame(rng, message)
            time_us += rng.randint(50, 2000)
            log.write(log_line(time_us, rng.choice(["can0", "can1"]), message, data))
            decoded = message.decode(data, decode_choices=False, scaling=True)
            bits = {
                name: struct.unpack("<Q", struct.pack("<d", value))[0]
                for name, value in decoded.items()
                if isinstance(value, float)
            }
            expected.write(json.dumps(
                {"line": n, "message": message.name, "signals": decoded, "f64_bits": bits}
            ) + "\n")


if __name__ == "__main__":
    main()
