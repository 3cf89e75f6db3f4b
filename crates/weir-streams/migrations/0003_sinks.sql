-- Sinks that leave the database: a webhook's or a NATS sink's settings (names of environment
-- variables, never secrets), and what their deliveries did.
alter table weir.subscriptions
    add column sink_config   jsonb,         -- null for client and rust sinks
    add column sink_error    text,          -- why the last process that tried could not build the sink
    add column sink_error_at timestamptz;

-- Deliveries per emitter, written in the transaction that moves the emitter's checkpoint
-- (one row per lane: emitters never wait on each other's row).
create table weir.sink_deliveries (
    subscription      text        not null references weir.subscriptions (name) on delete cascade,
    lane              int         not null,
    delivered         bigint      not null default 0,
    last_position     bigint,
    last_delivered_at timestamptz,
    primary key (subscription, lane)
);
