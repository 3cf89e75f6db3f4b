-- (being written)
select 1;
