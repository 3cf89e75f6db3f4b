-- Backfills: existing rows of a watched table loaded into the log as `read` events, chunk by
-- chunk, by the ingesting process (DBLog watermarks keep a chunk's rows from overwriting a
-- newer live change). A row's progress (`last_key`, `rows_done`) is written in the same
-- transaction as the chunk's events, so a backfill resumes after its last stored chunk.
create table weir.backfills (
    id           bigserial primary key,
    entity       text        not null,            -- posts, sales.orders
    key_columns  text[]      not null,            -- the primary key it walks, in order
    state        text        not null default 'pending'
                 check (state in ('pending', 'running', 'done', 'failed', 'cancelled')),
    requested_by text        not null,            -- cli, http, operator <name>, table added
    chunk_size   int         not null check (chunk_size > 0),
    last_key     jsonb,                           -- text of the key columns of the last row stored
    rows_done    bigint      not null default 0,  -- rows read (events written + rows dropped)
    rows_written bigint      not null default 0,  -- `read` events written to the log
    rows_total   bigint,                          -- rows in the table when it started
    error        text,
    requested_at timestamptz not null default now(),
    started_at   timestamptz,
    updated_at   timestamptz not null default now(),
    finished_at  timestamptz
);

-- One backfill at a time per table.
create unique index backfills_one_active on weir.backfills (entity)
    where state in ('pending', 'running');
