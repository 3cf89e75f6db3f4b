-- Consumers that are subscriptions, stopping and starting, and pools that change size.

alter table weir.consumers
    -- operator (declared by the process that runs it) | subscription (kept in the database)
    add column kind       text   not null default 'operator',
    -- bumped when the lanes are re-split: every process restarts the consumer's lane tasks
    add column generation bigint not null default 0,
    -- a re-split in progress: lanes handle events up to here and wait; then the consumer has
    -- `next_lanes` lanes, all starting at `drain_to`
    add column drain_to   bigint,
    add column next_lanes int;

-- Which consumers each process runs: lanes are shared among the live processes that run the
-- consumer, not among all of them.
alter table weir.consumer_nodes add column consumers text[] not null default '{}';
