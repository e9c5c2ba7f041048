-- lease_key.lua: the lease-tag key every replica shares, and the keys it replaced.
--
-- The key lives only in the store, so a store that loses its data (a restart without
-- persistence, FLUSHALL) loses it while replicas still tag with it. Each replica calls
-- this at start (candidate: a fresh random key) and then every few seconds (candidate:
-- the key it tags with, replaces = 1). So the replicas still running put their key
-- back, and a replica started since agrees with them; and when one did start first and
-- its own key won, the others adopt it and leave theirs in the previous set, so tags made
-- under either key keep verifying everywhere until their connections are gone.
--
-- KEYS[1] the current key (STRING, hex)
-- KEYS[2] previous keys (SET of hex), same hash slot
-- ARGV[1] candidate key (hex): becomes the current key when there is none
-- ARGV[2] "1" when the candidate has tagged leases: kept in KEYS[2] if another key is current
-- ARGV[3] seconds the previous set is kept after its last addition
-- ARGV[4] at most this many previous keys are kept
--
-- Returns {current key, {previous keys...}}.
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1])
  current = ARGV[1]
elseif current ~= ARGV[1] and ARGV[2] == '1' then
  if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0
      and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[4]) then
    redis.call('SPOP', KEYS[2])
  end
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
local previous = redis.call('SMEMBERS', KEYS[2])
for i = #previous, 1, -1 do
  if previous[i] == current then
    table.remove(previous, i)
  end
end
return {current, previous}
