-- The event store: streams of domain events appended with an expected version.
--
-- weir.stream_events is in weir's publication: every append reaches weir.events through the
-- WAL (logged as kind `append`), so appended events and row changes share one gap-free order.
create table weir.stream_events (
    stream      text        not null,
    version     bigint      not null,              -- from 1, gap-free within the stream
    id          uuid        not null unique,       -- idempotency: a retried append finds it
    type        text        not null,
    data        jsonb       not null,
    metadata    jsonb       not null default '{}',
    tags        text[]      not null default '{}',
    recorded_at timestamptz not null default now(),
    primary key (stream, version)
);
