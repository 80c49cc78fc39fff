-- Record one SDK instance's heartbeat, within the limits that keep one token from flooding Redis.
--
-- KEYS[1] clients hash (instance -> record)     KEYS[2] clients by last report (sorted set)
-- KEYS[3] the token's instances (sorted set)    KEYS[4] the instance's heartbeats this minute (hash)
-- KEYS[5] the minute's evaluation counts (hash; a placeholder when there are none)
-- KEYS[6] instances by applied version (sorted set)
-- ARGV[1] instance id   ARGV[2] record JSON   ARGV[3] now (epoch seconds)   ARGV[4] applied version
-- ARGV[5] instances per token   ARGV[6] heartbeats per instance per minute
-- ARGV[7] seconds after which an instance is no longer live (may be evicted for a new one)
-- ARGV[8] seconds after which an instance is forgotten   ARGV[9] seconds counts are kept
-- ARGV[10..] evaluation counts: field, count, field, count...
--
-- Returns {"ok"} | {"rate", seconds to wait} | {"cap", seconds to wait}. Nothing is written unless
-- the heartbeat is accepted, and then all of it is.
local instance, now = ARGV[1], tonumber(ARGV[3])
local per_token, per_minute = tonumber(ARGV[5]), tonumber(ARGV[6])
local live_seconds, forget_seconds = tonumber(ARGV[7]), tonumber(ARGV[8])

local sent = tonumber(redis.call('HGET', KEYS[4], instance) or '0')
if sent >= per_minute then
  return {'rate', tostring(60 - math.floor(now) % 60)}
end

if not redis.call('ZSCORE', KEYS[3], instance) then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - forget_seconds)
  if redis.call('ZCARD', KEYS[3]) >= per_token then
    -- Make room by forgetting the token's longest silent instance, if it is no longer live.
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    local silent_since = tonumber(oldest[2])
    if silent_since > now - live_seconds then
      return {'cap', tostring(math.ceil(silent_since + live_seconds - now))}
    end
    redis.call('ZREM', KEYS[3], oldest[1])
    redis.call('HDEL', KEYS[1], oldest[1])
    redis.call('ZREM', KEYS[2], oldest[1])
    redis.call('ZREM', KEYS[6], oldest[1])
  end
end

redis.call('HINCRBY', KEYS[4], instance, 1)
redis.call('EXPIRE', KEYS[4], 120)
redis.call('HSET', KEYS[1], instance, ARGV[2])
redis.call('ZADD', KEYS[2], now, instance)
redis.call('ZADD', KEYS[6], ARGV[4], instance)
redis.call('ZADD', KEYS[3], now, instance)
redis.call('EXPIRE', KEYS[3], forget_seconds)
if #ARGV > 9 then
  for i = 10, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1])
  end
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[9]))
end
return {'ok'}
