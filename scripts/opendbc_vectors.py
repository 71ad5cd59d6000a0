#!/usr/bin/env python3
"""The opendbc corpus for tests/opendbc_corpus.rs: cantools' decoding of random frames of
every message of every DBC file in the pinned opendbc wheel.

  opendbc_vectors.py extract WHEEL SHA256 DIR
      Checks the wheel's SHA-256, unpacks its .dbc files under DIR and prints their paths
      relative to DIR, one a line.

  opendbc_vectors.py vectors JOBS RESULTS
      JOBS is a JSON object {"frames": K, "busy_frames": B, "jobs": [JOB, ...]} with
      JOB = {"dbc": path, "seed": n, "log": path, "expected": path,
             "skip": [message, ...], "busy": [message, ...]}.
      For each job: load the DBC with cantools (strict=False). When cantools refuses it,
      repair the text the one obvious way for that refusal and load again, noting the
      repair (the test checks which files needed which):
        ids          a standard id above 0x7FF is written as the extended id (bit 31 set),
                     in BO_ and in the statements that refer to it; a message whose id is
                     above 29 bits even then is removed
        digit-names  names starting with a digit get a prefix (taken off again in EXPECTED)
        unused-VAL_  VAL_ lines for signals that do not exist are removed
        comment      a CM_ statement cantools cannot read is removed
        semicolon    a CM_ or VAL_ statement without its `;` gets it
        number       a number written `.25` is written `0.25`
      and, in the database loaded:
        multiplexor  a signal marked `m` with no value that SG_MUL_VAL_ names the
                     multiplexor is made one (cantools loads it as a plain signal and then
                     never decodes the signals it selects; the agent reads it as `M`)
      Then K random frames for each multiplexor value of each message not in `skip` (B
      frames in all for a message in `busy`), in random order on can0, 2 to 20 ms apart
      and never on a whole 100 ms: LOG (candump -L) and EXPECTED as cantools_vectors.py
      writes them.
      RESULTS: a JSON list, one object per job: {"dbc", "loaded", "error", "repairs",
      "messages", "frames", "unencodable"}.

Needs: pip install cantools (45.1.0, as scripts/test.sh installs).
"""

import hashlib
import json
import os
import random
import re
import struct
import sys
import zipfile

import cantools

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cantools_vectors as cv  # noqa: E402

PREFIX = "RLDIGIT_"
EXTENDED = 0x80000000

# Statements whose first number names a message id.
ID_REF = re.compile(
    r'^(\s*(?:BO_|VAL_|SIG_VALTYPE_|BO_TX_BU_|SG_MUL_VAL_|SIG_GROUP_|CM_\s+(?:BO_|SG_)'
    r'|BA_\s+"[^"]*"\s+(?:BO_|SG_))\s+)(\d+)\b'
)


def extract(wheel, sha256, out_dir):
    with open(wheel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{wheel}: SHA-256 {digest}, expected {sha256}")
    names = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if name.endswith(".dbc"):
                z.extract(name, out_dir)
                names.append(name)
    for name in names:
        print(name)


def read_text(path):
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")


def message_block(lines, i):
    """The lines of the message whose BO_ line is i: it and its SG_ lines."""
    j = i + 1
    while j < len(lines) and lines[j].lstrip().startswith("SG_ "):
        j += 1
    return range(i, j)


def repair_ids(text):
    lines = text.split("\n")
    drop = set()
    removed = []
    rewritten = 0
    for i, line in enumerate(lines):
        m = ID_REF.match(line)
        if not m:
            continue
        v = int(m.group(2))
        if v & EXTENDED or v <= 0x7FF:
            continue
        is_message = line.lstrip().startswith("BO_ ")
        if is_message and "VECTOR__INDEPENDENT_SIG_MSG" in line:
            continue  # cantools leaves it out by itself
        if v <= 0x1FFFFFFF:
            lines[i] = m.group(1) + str(v | EXTENDED) + line[m.end(2):]
            rewritten += is_message
        elif is_message:
            drop.update(message_block(lines, i))
            removed.append(line.split()[2].rstrip(":"))
        else:
            drop.add(i)
    lines = [line for i, line in enumerate(lines) if i not in drop]
    what = f"ids: {rewritten} read as extended"
    if removed:
        what += f", {len(removed)} messages above 29 bits removed"
    return "\n".join(lines), what


def repair_digit_names(text):
    names = set(re.findall(r"^BO_\s+\d+\s+(\d\w*)\s*:", text, re.M))
    names |= set(re.findall(r"^\s+SG_\s+(\d\w*)\s", text, re.M))
    for name in names:
        text = re.sub(rf"(?<![\w.]){re.escape(name)}(?!\w)", PREFIX + name, text)
    return text, f"digit-names: {sorted(names)}"


def repair_unused_val(text, message):
    entries = re.findall(r"VAL_ (\d+) (\w+)", message)
    lines = [
        line for line in text.split("\n")
        if not any(re.match(rf"VAL_\s+{i}\s+{s}\s", line) for i, s in entries)
    ]
    return "\n".join(lines), f"unused-VAL_: {len(entries)}"


def repair_syntax(text, line_no, column):
    lines = text.split("\n")
    i = line_no - 1
    line = lines[i]
    rest = line[column - 1:]
    if re.match(r"\.\d", rest):
        lines[i] = line[:column - 1] + "0" + rest
        return "\n".join(lines), f"number: line {line_no}"
    if line.lstrip().startswith("CM_"):
        # Remove the statement: up to the line where its string closes.
        j, quotes = i, line.count('"')
        while quotes % 2 and j + 1 < len(lines):
            j += 1
            quotes += lines[j].count('"')
        del lines[i:j + 1]
        return "\n".join(lines), f"comment: removed line {line_no}"
    k = i - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    if (column == 1 and k >= 0 and re.match(r"(CM_|VAL_) ", lines[k])
            and not lines[k].rstrip().endswith(";")):
        lines[k] = lines[k].rstrip() + ";"
        return "\n".join(lines), f"semicolon: added on line {k + 1}"
    if re.match(r"\d", rest) and re.match(r"\s*(BO_|SG_)\s", line):
        return repair_digit_names(text)
    return None, None


def load(path):
    """cantools' database of the file, repaired where it must be, and the repairs."""
    text = read_text(path)
    repairs = []
    for _ in range(30):
        try:
            return cantools.database.load_string(text, "dbc", strict=False), repairs
        except Exception as e:  # noqa: BLE001 (cantools raises several kinds)
            message = str(e)
            repaired = None
            if "is more than 11 bits" in message:
                repaired, what = repair_ids(text)
            elif "unused VAL_ entries" in message:
                repaired, what = repair_unused_val(text, message)
            else:
                m = re.search(r"Invalid syntax at line (\d+), column (\d+)", message)
                if m:
                    repaired, what = repair_syntax(text, int(m.group(1)), int(m.group(2)))
            if repaired is None or repaired == text:
                raise RuntimeError(message) from e
            text = repaired
            repairs.append(what)
    raise RuntimeError("too many repairs")


def mark_multiplexors(db):
    """A signal that multiplexed signals name (SG_MUL_VAL_) but cantools does not take for
    a multiplexor (its SG_ line has `m` with no value) is made one, as the agent reads it;
    cantools would otherwise never decode the signals it selects."""
    marked = []
    for message in db.messages:
        named = {s.multiplexer_signal for s in message.signals if s.multiplexer_signal}
        for s in message.signals:
            if s.name in named and not s.is_multiplexer:
                s.is_multiplexer = True
                marked.append(f"{name(message.name)}.{name(s.name)}")
        if marked and marked[-1].startswith(name(message.name) + "."):
            message.refresh()
    return [f"multiplexor: {m}" for m in marked]


def name(n):
    return n[len(PREFIX):] if n.startswith(PREFIX) else n


def variants(message):
    """(multiplexor name, [values]) of a message multiplexed by one signal, or (None, [None])."""
    muxes = {s.multiplexer_signal for s in message.signals if s.multiplexer_signal}
    if not muxes:
        return None, [None]
    if len(muxes) > 1:
        raise ValueError("more than one multiplexor")
    values = sorted({v for s in message.signals for v in (s.multiplexer_ids or [])})
    return muxes.pop(), values


def encode(rng, message, mux, value):
    """A frame of `message` with random raw values, multiplexor value `value`."""
    carried = [
        s for s in message.signals
        if s.name != mux and (s.multiplexer_ids is None or value in s.multiplexer_ids)
    ]
    fixed = {}
    if mux is not None:
        m = message.get_signal_by_name(mux)
        fixed[mux] = cv.physical(m, value)
    for _ in range(100):
        values = dict(fixed)
        for s in carried:
            values[s.name] = cv.physical(s, cv.random_raw(rng, s))
        try:
            return message.encode(values, scaling=True, strict=False)
        except (cantools.database.EncodeError, OverflowError, ValueError):
            continue
    return None


def vectors(job, frames, busy_frames):
    result = {"dbc": job["dbc"], "loaded": False, "error": None, "repairs": [],
              "messages": 0, "frames": 0, "unencodable": []}
    try:
        db, result["repairs"] = load(job["dbc"])
    except RuntimeError as e:
        result["error"] = str(e)
        return result
    result["loaded"] = True
    result["repairs"] += mark_multiplexors(db)
    rng = random.Random(job["seed"])
    skip, busy = set(job["skip"]), set(job["busy"])
    plan = []
    for message in sorted(db.messages, key=lambda m: m.name):
        if name(message.name) in skip or not message.signals:
            continue
        try:
            mux, values = variants(message)
        except ValueError:
            result["unencodable"].append(name(message.name))
            continue
        result["messages"] += 1
        if name(message.name) in busy:
            picks = [values[k % len(values)] for k in range(busy_frames)]
        else:
            picks = [v for v in values for _ in range(frames)]
        plan.extend((message, mux, v) for v in picks)
    rng.shuffle(plan)
    time_us = 1_700_000_000_000_000 + job["seed"] * 1_000_003
    failed = set()
    with open(job["log"], "w") as log, open(job["expected"], "w") as expected:
        n = 0
        for message, mux, value in plan:
            data = encode(rng, message, mux, value)
            if data is None:
                failed.add(name(message.name))
                continue
            time_us += rng.randint(2_000, 20_000)
            if time_us % 100_000 == 0:
                time_us += 1
            n += 1
            log.write(cv.log_line(time_us, "can0", message, data))
            decoded = message.decode(data, decode_choices=False, scaling=True)
            bits = {
                name(k): struct.unpack("<Q", struct.pack("<d", v))[0]
                for k, v in decoded.items() if isinstance(v, float)
            }
            expected.write(json.dumps({
                "line": n, "message": name(message.name),
                "signals": {name(k): v for k, v in decoded.items()}, "f64_bits": bits,
            }) + "\n")
    result["frames"] = n
    result["unencodable"] += sorted(failed)
    return result


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "extract":
        extract(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "vectors":
        spec = json.load(open(sys.argv[2]))
        results = [vectors(j, spec["frames"], spec["busy_frames"]) for j in spec["jobs"]]
        json.dump(results, open(sys.argv[3], "w"), indent=1)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
