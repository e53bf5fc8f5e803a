-- settle.lua: replace a request's holds with what it really used. Idempotent.
--
-- KEYS[1]   reservation record (hash)                  asc:{tag}:res:<request id>
-- KEYS[2]   open holds index (zset)                    asc:{tag}:holds
-- ARGV[1]   final state: 'settled' or 'released'
-- ARGV[2]   record ttl (ms) of a tombstone: a release that finds no record leaves one, so
--           that a reserve arriving after it (a cancelled call still in flight) holds nothing
-- ARGV[3]   number of groups G, in the order reserve held them
-- ARGV[4..] per group: actual amount, limit, key count N, then its N counter keys
--           (current bucket first: the one the hold is on)
--
-- The counters share the record's hash tag (same cluster slot). A counter that no longer
-- exists has outlived its window (its TTL is longer than the window): nothing is returned
-- to it or charged to it, and it is never recreated (no key without a TTL, no negative held).
--
-- Returns {status, over_1 .. over_G}
--   status 1: this call settled the holds; 2: the sweeper had already returned them (the
--   real cost is still charged); 0: nothing to do (unknown, already settled or released).
--   over_g > 0: this settle charged more than it held on group g, and the group's
--   spent + held now exceeds its limit by over_g (recorded on the record as 'overrun').
local record = KEYS[1]
local state = redis.call('HGET', record, 'state')
if not state then
  if ARGV[1] == 'released' then
    redis.call('HSET', record, 'state', 'released', 'holds', '')
    redis.call('PEXPIRE', record, tonumber(ARGV[2]))
  end
  return {0}
end
if state ~= 'held' and state ~= 'expired' then
  return {0}
end
local holds = redis.call('HGET', record, 'holds')
local groups = tonumber(ARGV[3])
local result = {state == 'expired' and 2 or 1}
local overrun = 0
local base = 4
local g = 0
for key, held in string.gmatch(holds, '(%S+) (%S+)') do
  g = g + 1
  if g > groups then
    return redis.error_reply('fewer groups than holds')
  end
  local actual = tonumber(ARGV[base])
  local limit = tonumber(ARGV[base + 1])
  local count = tonumber(ARGV[base + 2])
  if actual == nil or actual < 0 then
    return redis.error_reply('bad actual amount for counter ' .. g)
  end
  local over = 0
  local returned = 0
  if state == 'held' then
    returned = tonumber(held)
  end
  if redis.call('EXISTS', key) == 1 then
    if returned > 0 then
      if redis.call('HINCRBY', key, 'held', -returned) < 0 then
        redis.call('HSET', key, 'held', 0)
      end
    end
    if actual > 0 then
      redis.call('HINCRBY', key, 'spent', actual)
    end
    if actual > returned then
      local used = 0
      for k = base + 3, base + 2 + count do
        local values = redis.call('HMGET', ARGV[k], 'spent', 'held')
        used = used + (tonumber(values[1]) or 0) + (tonumber(values[2]) or 0)
      end
      if used > limit then
        over = math.min(used - limit, actual - returned)
        redis.call('HINCRBY', key, 'overrun', over)
      end
    end
  end
  result[g + 1] = over
  if over > overrun then
    overrun = over
  end
  base = base + 3 + count
end
redis.call('HSET', record, 'state', ARGV[1])
if overrun > 0 then
  redis.call('HSET', record, 'overrun', overrun)
end
redis.call('ZREM', KEYS[2], record)
return result
