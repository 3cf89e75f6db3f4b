#!/usr/bin/env python3
"""Regenerates the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from real sources.

    python3 fuzz/capture.py            # as root (runs PostgreSQL as `postgres`) or as postgres

Where the seeds come from:

    pgoutput  a private PostgreSQL 15 cluster (wal_level=logical, logical_decoding_work_mem=64kB)
              in a temporary directory on a random port: each scenario below runs its SQL, then
              pg_logical_slot_get_binary_changes(slot, NULL, NULL, 'proto_version', '2',
              'publication_names', 'pub', 'streaming', 'on', 'messages', 'true') takes the raw
              pgoutput messages it produced. One seed per scenario, framed as the target reads
              its input: [version selector 0 = protocol 2] then [u16 length][message] each.
              Every scenario is its own decoding session, so each seed starts with the Relation
              (and Type) messages its changes need.
    cast      the text output of every column of the scenario tables, under the settings weir's
              replication session uses (DateStyle=ISO, TimeZone=UTC, IntervalStyle=iso_8601,
              bytea_output=hex, extra_float_digits=3): [0xff][u32 oid][text]. The enum `mood`
              and `mood[]` get oids 16384 and 16385, the ones the target teaches its registry.
    config    every weir.toml in the repository, `weir demo`'s configuration, and every ```toml
              block of docs/*.md and README.md, as is; the same with WEIR_* variables after
              a NUL byte.
    http_bodies  every JSON object of the docs (```json blocks, curl -d '…' bodies) and the
              one-line json!({…}) literals of the HTTP tests that are plain JSON, under the
              body types its keys fit (all when none does): [body selector][json].

The slot is dropped and the cluster stopped and removed at the end, also on failure. Seeds are
named after their content's SHA-1 (as libFuzzer names corpus files) with the scenario in front,
so a rerun replaces them rather than adding near-duplicates.
"""

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

PG_BIN = pathlib.Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
SLOT = "weir_fuzz_capture"
OPTIONS = ("'proto_version', '2', 'publication_names', 'pub', 'streaming', 'on', "
           "'messages', 'true'")
# The settings weir's replication session sets (crates/weir-source/src/cast.rs's module docs).
SESSION = ("set datestyle = iso; set timezone = 'UTC'; set intervalstyle = iso_8601; "
           "set bytea_output = hex; set extra_float_digits = 3;")
# The oids the cast target learns (fuzz/fuzz_targets/cast.rs).
LEARNED = {"mood": 16384, "_mood": 16385}

SCHEMA = """
create type mood as enum ('happy', 'sad');
-- The table of crates/weir/tests/ingest.rs `every_supported_type_round_trips`.
create table t (
  id int primary key, b bool, i2 int2, i8 int8, f4 float4, f8 float8, n numeric,
  tx text, vc varchar(10), ch char(3), nm name, u uuid, j json, jb jsonb,
  d date, tm time, ts timestamp, tz timestamptz, iv interval, by bytea, m mood,
  ai int4[], at text[], am mood[], inet_v inet, nan float8
);
-- More types, arrays of the cast kinds among them.
create table more (
  id int primary key, pt point, bx box, bxs box[], r4 int4range, tr tsrange, mo money,
  bi bit(3), vb varbit, mac macaddr, ci cidr, x xml, tv tsvector, o oid, lsn pg_lsn,
  ttz timetz, f4s float4[], tzs timestamptz[], ns numeric[], jbs jsonb[], bys bytea[],
  us uuid[], ds date[], bs bool[], i8s int8[], js json[], m2 int4[][], c "char", i8r int8range
);
create table d (id int primary key, v text);
create table f (id uuid primary key, v text, w int);
alter table f replica identity full;
create table big (id int primary key, doc text, n int);
alter table big alter column doc set storage external;
create table bigfull (id int primary key, doc text, n int);
alter table bigfull alter column doc set storage external;
alter table bigfull replica identity full;
create table nokey (a int, b text);
alter table nokey replica identity nothing;
create table idx (a int not null, b text not null, c int);
create unique index idx_ab on idx (a, b);
alter table idx replica identity using index idx_ab;
create schema sales;
create table sales.orders (id bigint primary key, total numeric(12, 2), placed timestamptz,
  status mood);
create table weir_stream (id serial primary key, payload text, m mood);
create publication pub for all tables;
"""

TYPES_ROWS = r"""
insert into t values (1, true, -2, 9007199254740993, 1.5, 2.25, 12345678901234567890.000000001,
  'héllo', 'v', 'ab', 'nm', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}',
  '{"b": null}', '2024-02-29', '13:14:15.5', '2024-01-02 03:04:05.123456',
  '2024-01-02 03:04:05+02', '1 year 2 months 3 days 04:05:06', '\x0aff', 'sad', '{1,NULL,3}',
  '{"a b","c\"d",NULL}', '{happy,sad}', '10.0.0.1/8', 'NaN');
insert into t (id) values (2);
insert into t values (3, false, 32767, -9223372036854775808, '-Infinity', 1e308,
  'NaN', '', 'ünï', 'x', 'pg_catalog', '00000000-0000-0000-0000-000000000000',
  '123456789012345678901234567890', '[1e400, -0, 0.1000000000000000000000000001]',
  'infinity', '24:00:00', '-infinity', '0044-03-15 12:00:00 BC', '-1 day -00:00:01',
  '\x', 'happy', '{}', '{"",NULL,"NULL","e\\f"}', '{}', '::1', '-0');
update t set tx = 'changed', ai = '[0:1]={7,8}' where id = 1;
delete from t where id = 2;
"""

MORE_ROWS = r"""
insert into more values (1, '(1,2)', '((1,1),(0,0))', '{(1,1),(0,0);(2,2),(1,1)}', '[1,5)',
  '["2024-01-01 00:00","2024-02-01 00:00")', 12.34, B'101', B'11', '08:00:2b:01:02:03',
  '192.168.0.0/24', '<a>x</a>', 'fat cat', 4294967295, '16/B374D848', '03:04:05+05:30',
  '{1.5,NaN,-Infinity}', '{"2024-01-02 03:04:05.5+00","1900-01-01 00:00:00+00"}',
  '{1.50,NaN}', array['{"a": 1}'::jsonb, '[1, 2]'], '{"\\x0a0b","\\x"}',
  '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '{2024-01-02,infinity}', '{t,f,NULL}',
  '{9223372036854775807}', array['"s"'::json, '{"n": 1e131072}'], '{{1,2},{3,4}}', 'q',
  'empty');
insert into more (id, tzs) values (2, array['1850-06-01 12:00:00+00'::timestamptz]);
"""

# name → SQL run before the changes are taken.
SCENARIOS = [
    ("types", TYPES_ROWS),
    ("more_types", MORE_ROWS),
    ("identity", """
        insert into d values (1, 'a');
        update d set v = 'b' where id = 1;
        update d set id = 2 where id = 2 - 1;
        delete from d where id = 2;
        insert into f values ('00000000-0000-0000-0000-000000000001', 'a', 1);
        update f set v = 'b' where w = 1;
        delete from f;
        insert into idx values (1, 'x', 1);
        update idx set c = 2;
        update idx set b = 'y';
        delete from idx;
        insert into nokey values (1, 'a');
        insert into sales.orders values (1, 9.99, '2024-01-02 03:04:05+00', 'happy');
        update sales.orders set total = 10 where id = 1;
    """),
    ("toast", """
        insert into big values (1, repeat('x', 10000), 0);
        update big set n = 1 where id = 1;
        insert into bigfull values (1, repeat('y', 10000), 0);
        update bigfull set n = 1 where id = 1;
        delete from big;
    """),
    ("truncate", """
        insert into d values (10, 'a');
        truncate d;
        truncate d, f restart identity cascade;
        begin; insert into d values (11, 'b'); truncate nokey; commit;
    """),
    ("messages", r"""
        select pg_logical_emit_message(true, 'weir', '{"a":1}');
        select pg_logical_emit_message(false, 'weir.audit', 'sent at once');
        select pg_logical_emit_message(true, 'other', 'not ours');
        select pg_logical_emit_message(true, 'weir-backfill', 'low 1');
        select pg_logical_emit_message(true, 'weir', '\xff00fe'::bytea);
        begin;
        insert into d values (20, 'with a message');
        select pg_logical_emit_message(true, 'weir.x', '');
        commit;
    """),
    ("origin", """
        select pg_replication_origin_create('fuzz_origin');
        select pg_replication_origin_session_setup('fuzz_origin');
        begin;
        select pg_replication_origin_xact_setup('0/1234', now());
        insert into d values (30, 'from elsewhere');
        commit;
        select pg_replication_origin_session_reset();
        select pg_replication_origin_drop('fuzz_origin');
    """),
    ("schema_change", """
        insert into d values (40, 'before');
        alter table d add column extra int default 7;
        insert into d values (41, 'after', 8);
        alter table d drop column extra;
        update d set v = 'dropped' where id = 41;
    """),
    # More than logical_decoding_work_mem (64kB) of changes: streamed in blocks.
    ("stream_commit", """
        begin;
        insert into weir_stream (payload, m)
          select md5(g::text), 'happy' from generate_series(1, 700) g;
        update weir_stream set payload = 'u' where id % 50 = 0;
        commit;
    """),
    ("stream_subxact_abort", """
        begin;
        insert into weir_stream (payload) select md5(g::text) from generate_series(1, 500) g;
        savepoint s1;
        insert into weir_stream (payload) select md5(g::text) from generate_series(1, 300) g;
        rollback to savepoint s1;
        savepoint s2;
        delete from weir_stream where id % 97 = 0;
        release savepoint s2;
        commit;
    """),
    ("stream_abort", """
        begin;
        insert into weir_stream (payload) select md5(g::text) from generate_series(1, 800) g;
        rollback;
        -- An abort record is not flushed at once; a commit after it is.
        insert into nokey values (0, 'flush');
    """),
    ("stream_truncate_message", """
        begin;
        insert into weir_stream (payload) select md5(g::text) from generate_series(1, 600) g;
        select pg_logical_emit_message(true, 'weir', 'inside a stream');
        truncate nokey;
        commit;
    """),
]


def run_as_postgres():
    """The prefix that runs a command as the postgres user (nothing when we are it)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]


class Cluster:
    def __init__(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="weir-fuzz-capture-"))
        self.data = self.dir / "data"
        self.port = random.randint(20000, 60000)
        self.started = False
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    def pg(self, *args, **kwargs):
        return subprocess.run(run_as_postgres() + list(args), check=True, **kwargs)

    def start(self):
        self.pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--locale=C", stdout=subprocess.DEVNULL)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"""
port = {self.port}
listen_addresses = ''
unix_socket_directories = '{self.dir}'
wal_level = logical
max_replication_slots = 4
max_wal_senders = 4
logical_decoding_work_mem = 64kB
fsync = off
""")
        self.pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                "-w", "start", stdout=subprocess.DEVNULL)
        self.started = True

    def sql(self, text):
        """Runs `text`, each statement in its own transaction unless it says `begin`; returns
        the rows it printed, fields split on `|`."""
        out = self.pg(str(PG_BIN / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                      "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                      "-d", "postgres", "-f", "-", input=text, capture_output=True, text=True)
        return [line.split("|") for line in out.stdout.splitlines()]

    def stop(self):
        if self.started:
            try:
                self.sql(f"select pg_drop_replication_slot('{SLOT}') from pg_replication_slots "
                         f"where slot_name = '{SLOT}'")
            finally:
                self.pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                        "stop", stdout=subprocess.DEVNULL)
                self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


def seed(target, name, content):
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}-{hashlib.sha1(content).hexdigest()[:16]}").write_bytes(content)


def frame(messages):
    """The pgoutput target's input: protocol selector 0 (→ 2), then [u16 length][message]."""
    out = bytearray([0])
    for m in messages:
        if len(m) > 0xFFFF:
            sys.exit(f"a message of {len(m)} bytes does not fit the u16 framing")
        out += struct.pack(">H", len(m)) + m
    return bytes(out)


def take(cluster, extra=""):
    rows = cluster.sql(f"{SESSION} select encode(data, 'hex') from "
                       f"pg_logical_slot_get_binary_changes('{SLOT}', NULL, NULL, {OPTIONS}"
                       f"{extra})")
    return [bytes.fromhex(r[0]) for r in rows]


def capture_pgoutput(cluster):
    for target in ("pgoutput", "cast"):
        shutil.rmtree(CORPUS / target, ignore_errors=True)
    cluster.sql(SCHEMA)
    cluster.sql(f"select pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    tags = set()
    for name, statements in SCENARIOS:
        cluster.sql(statements)
        if name == "more_types":
            # The same changes in the binary format too (the `binary` option): 'b' columns.
            rows = cluster.sql(f"{SESSION} select encode(data, 'hex') from "
                               f"pg_logical_slot_peek_binary_changes('{SLOT}', NULL, NULL, "
                               f"{OPTIONS}, 'binary', 'true')")
            seed("pgoutput", "more_types_binary", frame([bytes.fromhex(r[0]) for r in rows]))
        messages = take(cluster)
        tags.update(chr(m[0]) for m in messages)
        seed("pgoutput", name, frame(messages))
        print(f"pgoutput/{name}: {len(messages)} messages, tags {''.join(sorted({chr(m[0]) for m in messages}))}")
    print(f"pgoutput tags seen: {''.join(sorted(tags))}")


def capture_cast(cluster):
    columns = cluster.sql("""
        select c.relname, a.attname, a.atttypid, t.typname from pg_attribute a
        join pg_class c on c.oid = a.attrelid join pg_type t on t.oid = a.atttypid
        where c.relname in ('t', 'more') and a.attnum > 0 and not a.attisdropped
        order by c.relname, a.attnum""")
    count = 0
    for table, column, oid, typname in columns:
        oid = LEARNED.get(typname, int(oid))
        values = cluster.sql(f'{SESSION} select "{column}"::text is null, "{column}"::text '
                             f"from {table} order by id")
        for is_null, text in values:
            if is_null == "t":
                continue
            seed("cast", f"{typname}", b"\xff" + struct.pack(">I", oid) + text.encode())
            count += 1
    print(f"cast: {count} seeds")


def capture_config():
    shutil.rmtree(CORPUS / "config", ignore_errors=True)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "*weir.toml", "*.toml"],
                           capture_output=True, text=True, check=True).stdout.split()
    texts = []
    for f in files:
        path = ROOT / f
        if path.name == "weir.toml" or "examples" in path.parts:
            texts.append((path.stem, path.read_text()))
    for md in sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]:
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", md.read_text(), re.S)):
            texts.append((f"{md.stem}-{i}", block))
    # `weir demo`'s configuration (crates/weir-cli/src/demo.rs).
    demo = (ROOT / "crates" / "weir-cli" / "src" / "demo.rs").read_text()
    texts += [("demo", t) for t in re.findall(r'const DEMO_TOML: &str = r#"(.*?)"#', demo, re.S)]
    # A URL the validator accepts, the rest as weir run would see them.
    env = ("WEIR_DATABASE_URL=postgres://weir@localhost:5432/app\nWEIR_SOURCE_SLOT=other_slot\n"
           "WEIR_CONSUMERS_LANES=4\nWEIR_HTTP_BIND=0.0.0.0:7070\nDATABASE_URL=postgres://x@y/z\n")
    for name, text in texts:
        seed("config", name, text.encode())
        seed("config", f"{name}-env", text.encode() + b"\0" + env.encode())
    # Inputs that crashed once (docs/fuzzing.md), kept so every run tries them again.
    for name, content in CONFIG_REGRESSIONS:
        seed("config", name, content)
    print(f"config: {len(texts)} documents, {len(CONFIG_REGRESSIONS)} regressions")


# A `nan` in a JSON value, then an override: the TOML round trip of the overrides panicked.
CONFIG_REGRESSIONS = [
    ("regression-nan-override", b'[[subscriptions]]\nname = "s"\ntype = "stream"\n'
     b'selector = nan\n\0WEIR_SOURCE_SLOT=other\n'),
]


# The order of weir_server::fuzzing::BODIES.
BODIES = ["append", "truncate", "snapshot", "subscription_create", "subscription_update",
          "ack", "parked_selection", "job", "backfill"]


def capture_http_bodies():
    """The JSON objects of the docs (```json blocks, curl -d bodies) and of the HTTP tests'
    one-line `json!({…})` literals that are plain JSON (no Rust expressions in them)."""
    shutil.rmtree(CORPUS / "http_bodies", ignore_errors=True)
    candidates = []
    for md in sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]:
        text = md.read_text()
        candidates += re.findall(r"```json\n(.*?)```", text, re.S)
        candidates += re.findall(r"(?:-d|--data|--data-raw) '(\{.*?\})'", text, re.S)
    for test in sorted(ROOT.glob("crates/weir-server/tests/*.rs")) + sorted(
            ROOT.glob("crates/weir-cli/tests/*.rs")):
        candidates += re.findall(r"json!\((\{.*?\})\)", test.read_text())
    bodies = set()
    for c in candidates:
        try:
            value = json.loads(c)
        except ValueError:
            continue
        if isinstance(value, dict):
            bodies.add(json.dumps(value, ensure_ascii=False))
    count = 0
    for b in sorted(bodies):
        for i in body_types(json.loads(b)):
            seed("http_bodies", BODIES[i], bytes([i]) + b.encode())
            count += 1
    print(f"http_bodies: {len(bodies)} bodies, {count} seeds")


def body_types(value):
    """The bodies `value` was written for, by its keys; every one when none fits."""
    keys = set(value)
    fits = {
        "append": bool(keys & {"events", "expected_version"}),
        "truncate": keys == {"before"},
        "snapshot": {"version", "data"} <= keys,
        "subscription_create": {"name", "type", "selector"} <= keys,
        "subscription_update": bool(keys) and "name" not in keys
        and keys <= {"type", "selector", "pool_size", "options", "sink"},
        "ack": "token" in keys,
        "parked_selection": keys <= {"position"},
        "job": "kind" in keys,
        "backfill": "tables" in keys,
    }
    chosen = [i for i, name in enumerate(BODIES) if fits[name]]
    return chosen or range(len(BODIES))


def main():
    only = set(sys.argv[1:])
    if not only or only & {"pgoutput", "cast"}:
        cluster = Cluster()
        try:
            cluster.start()
            capture_pgoutput(cluster)
            capture_cast(cluster)
        finally:
            cluster.stop()
    if not only or "config" in only:
        capture_config()
    if not only or "http_bodies" in only:
        capture_http_bodies()


if __name__ == "__main__":
    main()
