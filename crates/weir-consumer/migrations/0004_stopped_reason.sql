-- Why a consumer is stopped when its handler stopped it (a webhook receiver answered 410
-- Gone); empty when someone stopped it. `start` clears it.
alter table weir.consumers add column stopped_reason text;
