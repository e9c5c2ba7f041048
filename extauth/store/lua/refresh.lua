-- refresh.lua: extend one live lease; never resurrects an expired or released one.
--
-- KEYS[1] leases_key (ZSET: member = lease id, score = expiry ms)
-- ARGV[1] lease member
-- ARGV[2] new TTL in ms (expiry becomes now + TTL)
--
-- Returns 1 when the lease was live and is extended, 0 when it was absent or
-- already expired (an expired entry is removed on the way).
-- Time is the Redis server clock (TIME).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
if tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
