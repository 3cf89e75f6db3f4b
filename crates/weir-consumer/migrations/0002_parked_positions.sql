-- The processed channel asks "was this event ever parked?" for every event it announces; the
-- permanent answer is a failure row with outcome `park`. Without an index that is a scan of
-- every failure ever recorded.
create index if not exists consumer_failures_parked
    on weir.consumer_failures (position) where outcome = 'park';
