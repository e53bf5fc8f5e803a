-- settle.lua: replace a request's holds with what it really used. Idempotent.
--
-- KEYS[1]   reservation record (hash)                  asc:{tag}:res:<request id>
-- KEYS[2]   open holds index (zset)                    asc:{tag}:holds
-- ARGV[1]   final state: 'settled' or 'released'
-- ARGV[2..] actual amount per held counter, in the order reserve held them
--
-- The counters named in the record share the record's hash tag (same cluster slot).
-- Returns 1 when this call settled the holds,
--         2 when the sweeper had already returned them (the real cost is still charged),
--         0 when there is nothing to do (unknown, already settled or released).
local record = KEYS[1]
local state = redis.call('HGET', record, 'state')
if state ~= 'held' and state ~= 'expired' then
  return 0
end
local holds = redis.call('HGET', record, 'holds')
local i = 0
for key, held in string.gmatch(holds, '(%S+) (%S+)') do
  i = i + 1
  local actual = tonumber(ARGV[i + 1])
  if actual == nil or actual < 0 then
    return redis.error_reply('bad actual amount for counter ' .. i)
  end
  if state == 'held' then
    redis.call('HINCRBY', key, 'held', -tonumber(held))
  end
  redis.call('HINCRBY', key, 'spent', actual)
end
redis.call('HSET', record, 'state', ARGV[1])
redis.call('ZREM', KEYS[2], record)
if state == 'expired' then
  return 2
end
return 1
