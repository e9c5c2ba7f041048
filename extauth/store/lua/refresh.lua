-- refresh.lua: keep a live connection's lease; put it back if the store lost it.
--
-- Called only for access-log entries Envoy emits while the WebSocket is open
-- (tunnel established, periodic), so the connection exists: a missing or expired
-- lease means the store lost it (a Redis restart without persistence, a failover,
-- FLUSHALL, refreshes cut off for a whole TTL by an outage) and the connection
-- would otherwise go uncounted for the rest of its life. Restoring never asks the
-- quota: the connection is already open. A release always wins within a stream
-- (Envoy sends a connection's end entry after its refreshes, and extauth drops a
-- refresh whose end entry is in the same batch).
--
-- KEYS[1] leases_key (ZSET: member = lease id, score = expiry ms)
-- ARGV[1] lease member
-- ARGV[2] new TTL in ms (expiry becomes now + TTL)
--
-- Returns 1 when the lease was live and is extended, 0 when it was absent or
-- expired and is restored.
-- Time is the Redis server clock (TIME).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local live = 0
if score and tonumber(score) > now then
  live = 1
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return live
