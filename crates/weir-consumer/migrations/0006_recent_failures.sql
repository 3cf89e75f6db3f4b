-- A consumer's latest failures (GET /v1/consumers/{name}/failures, the console) without
-- scanning every consumer's history backwards.
create index if not exists consumer_failures_recent on weir.consumer_failures (consumer, id desc);
