-- A rebuild of a SQL operator's target table (`weir operators rebuild`): while the row exists
-- the consumer is stopped and its shadow table is being built (or was, by a rebuild that was
-- killed: running it again starts the shadow over; `--abort` drops it). The row goes in the
-- transaction that swaps the shadow in, or with the abort. Progress is counted in keys.
create table weir.rebuilds (
    consumer    text primary key references weir.consumers (name) on delete cascade,
    target      text not null,               -- schema.table, as `regclass` prints it
    shadow      text not null,               -- weir_rebuild.<table>
    process     text not null,               -- the process that began it (host:pid:tag)
    started_at  timestamptz not null default now(),
    keys_total  bigint,                      -- known once the keys have been read
    keys_done   bigint not null default 0,
    updated_at  timestamptz not null default now()
);
