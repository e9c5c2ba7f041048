-- hostile.lua: count one hostile signal for an IP; ban it when the count reaches the threshold.
--
-- KEYS[1] hostile_key (ZSET: member = signal, score = its latest ms)
-- KEYS[2] ban_key (STRING holding the reason, with PX expiry)
-- ARGV[1] threshold
-- ARGV[2] window in ms
-- ARGV[3] member naming this signal's evidence: the same member again within the
--         window moves its score and is counted once
-- ARGV[4] ban duration in ms
-- ARGV[5] '1' = dry run (count and report, never ban)
-- ARGV[6] ban reason
--
-- Returns {reached, ban_expires_at_ms}: reached is 1 when this signal brought
-- the count to the threshold (the log is then cleared, so the next ban needs a
-- full threshold again); ban_expires_at_ms is 0 when no ban was set.
-- Time is the Redis server clock (TIME).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  return {0, 0}
end
redis.call('DEL', KEYS[1])
if ARGV[5] == '1' then
  return {1, 0}
end
local ms = tonumber(ARGV[4])
redis.call('SET', KEYS[2], ARGV[6], 'PX', ms)
return {1, now + ms}
