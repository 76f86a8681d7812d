#!/usr/bin/env python3
"""Writes the text seed corpora of the fuzz targets from the test suites.

    fuzz/make_seeds.py   # writes fuzz/seeds/{sql_policy,broker_sql,policy_yaml,config_toml}

broker_sql:  the same SQL, without the selector byte, and the federation
             examples of docs/federation.md.
sql_policy:  SQL string literals of policy/tests, connector/tests and
             tests/python (and the README's), each prefixed with the
             selector byte of a caller that may plausibly run it (see
             fuzz_targets/sql_policy.rs).
policy_yaml: the demo policy, connector/tests/policies, the examples'
             policies, the YAML blocks of docs/ and the policies inlined in
             policy/tests.
config_toml: the embedded default, examples' configs, the TOML blocks of
             docs/ and the configs inlined in the tests.

The binary seeds (tickets, assertions, Flight commands, audit lines,
receipts) are written by the targets themselves: see tests/fuzz.sh --seeds.
Seeds are named by the SHA-1 of their content, as libFuzzer names its
corpus files, so re-running is idempotent.
"""

import hashlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
MAX_SEED = 8192

# Selector bytes (fuzz_targets/sql_policy.rs): principal | purpose << 3 | ε | prepare.
PLANNING = 0 | 1 << 3  # city planning, purpose urban-planning
SUPPLIER = 1  # axle suppliers, no purpose
RESEARCH = 2 | 2 << 3 | 0x20  # research institute, purpose research, ε 0.5
ADMIN = 3
STRANGER = 4
PREPARE = 0x40


def write(target, data):
    if not data or len(data) > MAX_SEED:
        return
    directory = SEEDS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)


def rust_literals(text):
    """String literals of Rust source: "…" (escapes undone) and r#"…"#."""
    for m in re.finditer(r'r(#+)"(.*?)"\1', text, re.S):
        yield m.group(2)
    text = re.sub(r'r(#+)".*?"\1', "", text, flags=re.S)
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', text, re.S):
        s = m.group(1)
        # A trailing backslash continues the literal on the next line.
        s = re.sub(r"\\\n\s*", "", s)
        s = s.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")
        yield s


def python_literals(text):
    for m in re.finditer(r'(?:"""(.*?)"""|"((?:[^"\\\n]|\\.)*)"|\'((?:[^\'\\\n]|\\.)*)\')', text, re.S):
        yield next(g for g in m.groups() if g is not None)


SQL_START = re.compile(r"^\s*(SELECT|WITH|EXPLAIN|VALUES|\(\s*SELECT)\b", re.I)


def sql_seeds():
    found = set()
    sources = list((ROOT / "policy" / "tests").glob("*.rs"))
    sources += list((ROOT / "connector" / "tests").glob("*.rs"))
    sources += list((ROOT / "connector" / "tests").glob("common/*.rs"))
    for path in sources:
        for s in rust_literals(path.read_text()):
            found.add(s)
    for path in list((ROOT / "tests" / "python").glob("*.py")) + list((ROOT / "examples").rglob("*.py")):
        for s in python_literals(path.read_text()):
            found.add(s)
    for m in re.finditer(r'"((?:SELECT|EXPLAIN POLICY SELECT)[^"]*)"', (ROOT / "README.md").read_text()):
        found.add(m.group(1))
    for sql in sorted(found):
        # Templates (format! placeholders) and fragments are not statements.
        if not SQL_START.match(sql) or "{" in sql or sql.rstrip().upper().endswith(("FROM", "WHERE")):
            continue
        lower = sql.lower()
        if "machine_events" in lower:
            selectors = [SUPPLIER]
        elif "trips" in lower:
            selectors = [PLANNING, RESEARCH]
        else:
            selectors = [PLANNING]
        if "?" in sql or "$1" in sql:
            selectors = [s | PREPARE for s in selectors]
        for selector in selectors:
            write("sql_policy", bytes([selector]) + sql.encode())
        write("broker_sql", sql.encode())
    for m in re.finditer(r"(SELECT [^`\n]*?)(?:`|$)", (ROOT / "docs" / "federation.md").read_text(), re.M):
        write("broker_sql", m.group(1).encode())
    # A few callers the suites do not cover.
    for selector, sql in [
        (STRANGER, "SELECT * FROM zones"),
        (ADMIN, "SELECT count(*) FROM trips"),
        (5, "SELECT mode, count(*) FROM trips GROUP BY mode"),
        (PLANNING | PREPARE, "SELECT mode, count(*) FROM trips WHERE fare_eur > ? GROUP BY mode"),
        (RESEARCH, "EXPLAIN POLICY SELECT mode, count(*) FROM trips GROUP BY mode"),
    ]:
        write("sql_policy", bytes([selector]) + sql.encode())


def code_blocks(text, language):
    return re.findall(r"```" + language + r"\n(.*?)```", text, re.S)


def policy_seeds():
    paths = [ROOT / "connector" / "src" / "dev" / "demo_policy.yaml"]
    paths += list((ROOT / "connector" / "tests" / "policies").glob("*.yaml"))
    paths += list((ROOT / "examples").rglob("*.yaml"))
    for path in paths:
        write("policy_yaml", path.read_bytes())
    for doc in (ROOT / "docs").glob("*.md"):
        for block in code_blocks(doc.read_text(), "yaml"):
            write("policy_yaml", block.encode())
    for path in list((ROOT / "policy" / "tests").rglob("*.rs")) + list((ROOT / "policy" / "src").rglob("*.rs")) + list((ROOT / "connector" / "tests").glob("*.rs")):
        for s in rust_literals(path.read_text()):
            if re.search(r"^\s*(version|consumers|datasets):", s, re.M) and "{}" not in s:
                write("policy_yaml", s.encode())


def config_seeds():
    paths = [ROOT / "connector" / "src" / "default.toml"]
    paths += list((ROOT / "examples").rglob("*.toml"))
    for path in paths:
        write("config_toml", path.read_bytes())
    for doc in (ROOT / "docs").glob("*.md"):
        for block in code_blocks(doc.read_text(), "toml"):
            write("config_toml", block.encode())
    sources = list((ROOT / "connector" / "src").rglob("*.rs")) + list((ROOT / "connector" / "tests").glob("*.rs"))
    for path in sources:
        for s in rust_literals(path.read_text()):
            if re.search(r"^\s*\[(\[?datasets\]?|server|limits|tls|policy|upstream|log|metrics)\]", s, re.M):
                write("config_toml", s.encode())


if __name__ == "__main__":
    sql_seeds()
    policy_seeds()
    config_seeds()
    for target in ("sql_policy", "broker_sql", "policy_yaml", "config_toml"):
        print(target, len(list((SEEDS / target).iterdir())))
