-- sweep.lua: return the holds of requests that never settled (crash, kill -9, lost stream).
--
-- KEYS[1]   open holds index (zset, score = expiry ms)  asc:{tag}:holds
-- ARGV[1]   now (ms)
-- ARGV[2]   at most this many records per call
--
-- Records and counters named in the index share its hash tag (same cluster slot).
-- A swept record is marked 'expired': a late settle then charges the real cost once.
-- A record reserved with on_expiry = 'charge' (the fast path, whose usage arrives by a
-- best-effort access log) has its holds charged as spent instead, and is marked 'charged':
-- a late settle then finds nothing to do (it never returns money).
-- A counter that no longer exists has outlived its window: it is not recreated.
-- Returns the number of records swept.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, record in ipairs(expired) do
  if redis.call('HGET', record, 'state') == 'held' then
    local holds = redis.call('HGET', record, 'holds')
    local charge = redis.call('HGET', record, 'on_expiry') == 'charge'
    for key, held in string.gmatch(holds, '(%S+) (%S+)') do
      if redis.call('EXISTS', key) == 1 then
        if redis.call('HINCRBY', key, 'held', -tonumber(held)) < 0 then
          redis.call('HSET', key, 'held', 0)
        end
        if charge then
          redis.call('HINCRBY', key, 'spent', tonumber(held))
        end
      end
    end
    redis.call('HSET', record, 'state', charge and 'charged' or 'expired')
  end
  redis.call('ZREM', KEYS[1], record)
end
return #expired
