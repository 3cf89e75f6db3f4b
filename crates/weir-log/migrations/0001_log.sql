-- The event log and the source's persisted progress.

-- One row per distinct shape of a watched table (schema, name, column types, key columns).
-- Events point here instead of repeating the column map in every row.
create table weir.relations (
    id          serial primary key,
    schema_name text   not null,
    table_name  text   not null,
    columns     jsonb  not null,              -- {"column": "type name", ...} in table order
    key_columns text[] not null,
    created_at  timestamptz not null default now(),
    unique (schema_name, table_name, columns, key_columns)
);

-- The source's progress: the last commit LSN whose changes are in the log and the last
-- position assigned. Written in the same transaction as every append, so on restart weir
-- resumes exactly after what it stored.
create table weir.source_state (
    slot       text primary key,
    lsn        pg_lsn not null default '0/0',
    position   bigint not null default 0,
    updated_at timestamptz not null default now(),
    -- Written about once a second by the ingesting process, for `weir status`.
    holder       text,                     -- host:pid of the leader
    heartbeat_at timestamptz,
    received_lsn pg_lsn,                   -- highest WAL position received
    confirmed_lsn pg_lsn,                  -- position acknowledged to the slot (covers idle WAL)
    behind_ms    bigint                    -- commit-to-log delay of the last append; 0 when idle
);

-- The log itself. Position is gap-free and assigned by the single ingesting writer in WAL
-- commit order. Range partitions over position make dropping old events cheap.
create table weir.events (
    position        bigint      not null,
    lsn             pg_lsn      not null,      -- commit LSN of the source transaction
    xid             bigint      not null,
    commit_ts       timestamptz not null,
    kind            text        not null,      -- insert | update | delete | truncate | message
    entity          text        not null,
    relation_id     int,                       -- weir.relations; null for messages
    key             jsonb       not null,
    new_record      jsonb,
    old_record      jsonb,
    changes         jsonb,
    unchanged_toast jsonb,                     -- ["column", ...]
    primary key (position)
) partition by range (position);

create index events_entity_position on weir.events (entity, position);

-- Changes of a transaction that PostgreSQL streams before it commits (protocol 2 streaming).
-- They wait here, not in memory, until the commit (moved into weir.events) or the abort
-- (deleted). Unlogged: after a crash the slot sends the transaction again.
create unlogged table weir.staged_changes (
    xid             bigint  not null,          -- top-level transaction
    subxid          bigint  not null,          -- the (sub)transaction that made the change
    seq             bigint  not null,          -- WAL order within the transaction
    kind            text    not null,
    entity          text    not null,
    relation_id     int,
    key             jsonb   not null,
    new_record      jsonb,
    old_record      jsonb,
    changes         jsonb,
    unchanged_toast jsonb,                     -- ["column", ...]
    primary key (xid, seq)
);
