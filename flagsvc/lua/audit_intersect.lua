-- Walk one audit index and keep the ids that every other index holds too: a filtered audit
-- query on several fields (actor and action, say) in one round trip.
--
-- KEYS[1]    the index to walk (the smallest), KEYS[2..] the other indexes
-- ARGV[1..2] low, high: ZRANGEBYSCORE bounds on the entries' sequence numbers ("(" = exclusive)
-- ARGV[3]    "desc" for newest first, anything else for oldest first
-- ARGV[4]    how many matching ids to return at most
-- ARGV[5]    how many ids of KEYS[1] to read at most in this call (bounds the time Redis spends)
--
-- Returns {state, last_score, id...}: state "done" when KEYS[1] has no more ids in range, "more"
-- otherwise; last_score is the score of the last id read ("" if none), from which the next call
-- goes on (exclusive).
local low, high, desc = ARGV[1], ARGV[2], ARGV[3] == 'desc'
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local chunk = 256
local found, read, last = {}, 0, ''
while read < budget do
  local batch
  if desc then
    batch = redis.call('ZREVRANGEBYSCORE', KEYS[1], high, low, 'WITHSCORES', 'LIMIT', 0, chunk)
  else
    batch = redis.call('ZRANGEBYSCORE', KEYS[1], low, high, 'WITHSCORES', 'LIMIT', 0, chunk)
  end
  for i = 1, #batch, 2 do
    local id = batch[i]
    read, last = read + 1, batch[i + 1]
    local everywhere = true
    for k = 2, #KEYS do
      if not redis.call('ZSCORE', KEYS[k], id) then
        everywhere = false
        break
      end
    end
    if everywhere then
      found[#found + 1] = id
      if #found >= want then
        return {'more', last, unpack(found)}
      end
    end
  end
  if #batch < chunk * 2 then
    return {'done', last, unpack(found)}
  end
  if desc then
    high = '(' .. last
  else
    low = '(' .. last
  end
end
return {'more', last, unpack(found)}
