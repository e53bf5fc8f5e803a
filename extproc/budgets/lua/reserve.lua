-- reserve.lua: hold a request's worst case on every limit it touches, all or nothing.
--
-- Counter keys are hashes {spent, held}. A limit ("group") may span several keys (the
-- buckets of a rolling window, current bucket first); it passes when
-- sum(spent + held over its keys) + amount <= limit. The hold lands on the first key.
--
-- KEYS[1]   reservation record (hash)                  asc:{tag}:res:<request id>
-- KEYS[2]   open holds index (zset, score = expiry ms)  asc:{tag}:holds
-- KEYS[3..] counter keys of every group, group after group
-- ARGV[1]   hold ttl (ms): after it the sweeper returns an unsettled hold
-- ARGV[2]   now (ms)
-- ARGV[3]   number of groups G
-- ARGV[4..] per group: key count, limit, amount, counter ttl (s)
-- ARGV[4+4G] optional: 1 = at expiry the sweeper charges the hold instead of returning it
--
-- Returns {1, remaining_1 .. remaining_G}  held now (remaining after this hold)
--         {2}                              this request id holds already: nothing changed
--         {0, g}                           group g would go over its limit: nothing held
local record = KEYS[1]
if redis.call('EXISTS', record) == 1 then
  return {2}
end
local hold_ttl = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local groups = tonumber(ARGV[3])

local first_keys, limits, amounts, ttls = {}, {}, {}, {}
local remaining = {1}
local key_index = 3
for g = 1, groups do
  local base = 4 + (g - 1) * 4
  local count = tonumber(ARGV[base])
  local limit = tonumber(ARGV[base + 1])
  local amount = tonumber(ARGV[base + 2])
  if amount < 0 then
    return redis.error_reply('negative amount')
  end
  local used = 0
  for k = key_index, key_index + count - 1 do
    local values = redis.call('HMGET', KEYS[k], 'spent', 'held')
    used = used + (tonumber(values[1]) or 0) + (tonumber(values[2]) or 0)
  end
  if used + amount > limit then
    return {0, g}
  end
  first_keys[g] = KEYS[key_index]
  limits[g] = limit
  amounts[g] = amount
  ttls[g] = tonumber(ARGV[base + 3])
  remaining[g + 1] = limit - used - amount
  key_index = key_index + count
end

local holds = {}
for g = 1, groups do
  redis.call('HINCRBY', first_keys[g], 'held', amounts[g])
  redis.call('EXPIRE', first_keys[g], ttls[g])
  holds[#holds + 1] = first_keys[g]
  holds[#holds + 1] = amounts[g]
end
redis.call('HSET', record, 'state', 'held', 'holds', table.concat(holds, ' '))
if ARGV[4 + groups * 4] == '1' then
  redis.call('HSET', record, 'on_expiry', 'charge')
end
-- The record outlives its hold so a late settle still finds it.
redis.call('PEXPIRE', record, hold_ttl * 2 + 86400000)
redis.call('ZADD', KEYS[2], now + hold_ttl, record)
return remaining
