"""The Lua scripts of the Redis engine: one round trip, one atomic step each.

Every script reads the time from the server (``TIME``), never from a client:
deadlines written by different hosts are compared with one clock (the root of
Redisson's fair-lock drift, redisson#2099, was client clocks). Every key a
script touches shares one hash tag (a namespace's, or a lock's), so each runs
unchanged on a Redis Cluster; keys derived inside a script (a namespace's
value keys, a waiter's mailbox) are of that slot too.

A namespace (the store, or one cache ``LOCATION``) is::

    {P|ns}:<key>    the value: decimal ASCII for an int (so INCRBY works),
                    otherwise a tag byte and the client's bytes (see .values)
    {P|ns}#i        ZSET of the live keys (score 0: ordered by key), for
                    keys(prefix), clear(), scans and culling
    {P|ns}#x        ZSET key -> deadline (server ms) of the keys that expire
    {P|ns}#l        present (PX 15 s, renewed) while a process listens to
                    the namespace: then every write publishes its events
    {P|ns}#e        the namespace's sharded pub/sub channel of listener
                    events (SPUBLISH: on a Cluster it stays on the
                    namespace's shard); see :mod:`.events`

The value keys carry their own expiry (``PXAT``), so a read never sees an
expired value; the two ZSETs are swept of keys past their deadline by every
write (a few at a time) and fully before anything that lists keys.

A lock ``K`` is (see :mod:`.locks` for the protocol)::

    {P:lock:K}:h    HASH tok, fence: the holder (PEXPIRE = its lease)
    {P:lock:K}:q    LIST of waiting tokens, FIFO
    {P:lock:K}:w    HASH token -> "place|wait deadline|lease" (server ms):
                    its place lasts until min(its last ask + one heartbeat,
                    its wait deadline); -1: no wait deadline
    {P:lock:K}:f    the last fencing token (expires a day after its last grant)
    {P:lock:K}:g:T  waiter T's mailbox: a release that hands the lock to T
                    pushes the grant's fence there
"""

from __future__ import annotations

# Errors a script raises on purpose: "CSHM <code> <message>" (codes of
# django_clustershm.exceptions), turned back into the exception by the transport.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Listener events (see .events). The presence key (the last of KEYS, so that
# it is declared and, with the namespace's hash tag, in the script's slot) is
# set by every listening process: without it a write publishes nothing (one
# EXISTS is its whole cost). An event is cmsgpack [code, member, value]:
# code 1 set, 2 remove, 4 evict, 5 clear (no member). A value over 64 KiB is
# left out (the listener reads the key instead). Expirations are not
# published here: the server's keyspace notifications (expired, evicted)
# tell them, including the ones this library's reaper's UNLINK triggers.
#
# Strict near caches (see .near): while a process keeps one of the namespace,
# its session is in the ZSET {P|ns}#s (score: its lease's end, server ms), and
# every key it copied has it in the SET {P|ns}#h:<key>. A write's emit() then
# collects the holders of each key it changes (every live session for a
# clear) and empties their sets; near_done() sends each live holder, on its
# sharded channel {P|ns}#n:<session>, [ack id, keys or false (all)].
# Strict listeners (STRICT_LISTENERS, see .events): their sessions are in
# {P|ns}#L; after a write's events, near_done() publishes [0, -, -, ack id]
# (its end) on the events channel. The script then returns [NEAR_MARK, ms
# until the last told session's lease ends, ack id, its own result, the
# sessions told...]: the transport waits until each acknowledged (pushed its
# session to {P|ns}#a:<id>), or until those leases end, before it returns.
_EVENTS = """
local LKEY = KEYS[#KEYS]
local TAG = string.sub(LKEY, 1, -3)
local LISTENING = redis.call('EXISTS', LKEY) == 1
local ECHAN = TAG .. '#e'
local SKEY = TAG .. '#s'
local LSKEY = TAG .. '#L'
local STRICT = redis.call('EXISTS', SKEY) == 1
local STRICT_L = LISTENING and redis.call('EXISTS', LSKEY) == 1
local TOLD_L = false
local NOTE = nil
local function hold(m)
  if not STRICT then return end
  if NOTE == nil then NOTE = {} end
  if m == nil then
    for _, s in ipairs(redis.call('ZRANGEBYSCORE', SKEY, '(' .. now, '+inf')) do NOTE[s] = true end
    return
  end
  local h = TAG .. '#h:' .. m
  for _, s in ipairs(redis.call('SMEMBERS', h)) do
    local ms = NOTE[s]
    if ms ~= true then
      if ms == nil then ms = {}; NOTE[s] = ms end
      ms[#ms + 1] = m
    end
  end
  redis.call('UNLINK', h)
end
local function emit(code, m, val)
  hold(m)
  if not LISTENING then return end
  if val and #val > 65536 then val = nil end
  redis.call('SPUBLISH', ECHAN, cmsgpack.pack({code, m, val}))
  TOLD_L = STRICT_L
end
local function near_done(r)
  if (NOTE == nil or next(NOTE) == nil) and not TOLD_L then return r end
  if type(r) == 'table' and r.err then return r end
  if r == nil then r = false end
  local id = redis.call('INCR', TAG .. '#c')
  local out = {NEAR_MARK, 0, id, r}
  local last = now
  for s, ms in pairs(NOTE or {}) do
    local dl = tonumber(redis.call('ZSCORE', SKEY, s) or '0')
    if dl > now then
      if ms == true then ms = false end
      redis.call('SPUBLISH', TAG .. '#n:' .. s, cmsgpack.pack({id, ms}))
      out[#out + 1] = s
      if dl > last then last = dl end
    end
  end
  if TOLD_L then
    redis.call('SPUBLISH', ECHAN, cmsgpack.pack({0, false, false, id}))
    local ls = redis.call('ZRANGEBYSCORE', LSKEY, '(' .. now, '+inf', 'WITHSCORES')
    for j = 1, #ls, 2 do
      out[#out + 1] = ls[j]
      local dl = tonumber(ls[j + 1])
      if dl > last then last = dl end
    end
  end
  if #out == 4 then return r end
  out[2] = last - now
  return out
end
"""

# Sweep up to n keys past their deadline out of the index (KEYS[2]) and the
# deadlines (KEYS[3]); ARGV[1] is the namespace's key prefix.
_REAP = """
local function reap(n)
  local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, n)
  for _, m in ipairs(due) do
    redis.call('ZREM', KEYS[2], m)
    redis.call('ZREM', KEYS[3], m)
    redis.call('UNLINK', ARGV[1] .. m)
  end
  return #due
end
local function reap_all()
  while reap(1000) == 1000 do end
end
local function forget(m)
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
end
"""

# Write one key (member m, value val, ttl_ms '' for none) into the namespace.
_PUT = """
local function put(m, val, ttl)
  local k = ARGV[1] .. m
  if ttl == '' then
    redis.call('SET', k, val)
    redis.call('ZREM', KEYS[3], m)
  else
    local dl = now + tonumber(ttl)
    redis.call('SET', k, val, 'PXAT', dl)
    redis.call('ZADD', KEYS[3], dl, m)
  end
  redis.call('ZADD', KEYS[2], 0, m)
end
-- Django's culling (MAX_ENTRIES, CULL_FREQUENCY) within one cache: when it
-- holds max_entries keys, drop 1/cull of them (all of them for 0), first
-- the expired, then in key order, as Django's DatabaseCache does.
local function cull(max_entries, freq)
  if max_entries == '' then return 0 end
  max_entries = tonumber(max_entries)
  if redis.call('ZCARD', KEYS[2]) < max_entries then return 0 end
  reap_all()
  local n = redis.call('ZCARD', KEYS[2])
  if n < max_entries then return 0 end
  freq = tonumber(freq)
  local count = n
  if freq > 0 then count = math.floor(n / freq) end
  local victims = redis.call('ZRANGE', KEYS[2], 0, count - 1)
  for _, m in ipairs(victims) do
    forget(m)
    if redis.call('UNLINK', ARGV[1] .. m) == 1 then emit(4, m) end
  end
  return #victims
end
"""

_HEAD = _NOW + _EVENTS + _REAP + _PUT

# KEYS: v i x l   ARGV: prefix member value ttl_ms max_entries cull
SET = (
    _HEAD
    + """
reap(16)
if redis.call('EXISTS', KEYS[1]) == 0 then cull(ARGV[5], ARGV[6]) end
put(ARGV[2], ARGV[3], ARGV[4])
emit(1, ARGV[2], ARGV[3])
return 1
"""
)

# KEYS: v i x l   ARGV: prefix member value ttl_ms max_entries cull  -> 1 stored, 0 present
ADD = (
    _HEAD
    + """
reap(16)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[4] ~= '' and tonumber(ARGV[4]) <= 0 then return 1 end
cull(ARGV[5], ARGV[6])
put(ARGV[2], ARGV[3], ARGV[4])
emit(1, ARGV[2], ARGV[3])
return 1
"""
)

# KEYS: v i x l   ARGV: prefix member value ttl_ms  -> 1 replaced, 0 absent
REPLACE = (
    _HEAD
    + """
reap(16)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[4] ~= '' and tonumber(ARGV[4]) <= 0 then
  redis.call('UNLINK', KEYS[1]); forget(ARGV[2]); emit(2, ARGV[2]); return 1
end
put(ARGV[2], ARGV[3], ARGV[4])
emit(1, ARGV[2], ARGV[3])
return 1
"""
)

# KEYS: v i x l   ARGV: prefix member  -> 1 existed
REMOVE = (
    _HEAD
    + """
reap(16)
local n = redis.call('UNLINK', KEYS[1])
forget(ARGV[2])
if n == 1 then emit(2, ARGV[2]) end
return n
"""
)

# KEYS: i x l   ARGV: prefix member...  -> how many existed
DELETE_MANY = (
    _NOW
    + _EVENTS
    + """
KEYS[3] = KEYS[2]; KEYS[2] = KEYS[1]
"""
    + _REAP
    + """
local n = 0
for j = 2, #ARGV do
  local gone = redis.call('UNLINK', ARGV[1] .. ARGV[j])
  n = n + gone
  forget(ARGV[j])
  if gone == 1 then emit(2, ARGV[j]) end
end
return n
"""
)

# KEYS: i x l   ARGV: prefix ttl_ms max_entries cull member value member value...
SET_MANY = (
    _NOW
    + _EVENTS
    + """
KEYS[3] = KEYS[2]; KEYS[2] = KEYS[1]
"""
    + _REAP
    + _PUT
    + """
reap(16)
local ttl = ARGV[2]
if ttl ~= '' and tonumber(ttl) <= 0 then
  for j = 5, #ARGV, 2 do
    if redis.call('UNLINK', ARGV[1] .. ARGV[j]) == 1 then emit(2, ARGV[j]) end
    forget(ARGV[j])
  end
  return 1
end
for j = 5, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[1] .. ARGV[j]) == 0 then cull(ARGV[3], ARGV[4]) end
  put(ARGV[j], ARGV[j + 1], ttl)
  emit(1, ARGV[j], ARGV[j + 1])
end
return 1
"""
)

# KEYS: v i x l   ARGV: prefix member delta init(''=KeyNotFound) max_entries cull  -> the new value
INCR = (
    _HEAD
    + """
reap(16)
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '' then return redis.error_reply('CSHM 8 Key ' .. ARGV[2] .. ' not found') end
  cull(ARGV[5], ARGV[6])
  put(ARGV[2], ARGV[4], '')
end
local r = redis.pcall('INCRBY', KEYS[1], ARGV[3])
if type(r) == 'table' and r.err then
  if string.find(r.err, 'overflow') then
    return redis.error_reply('CSHM 10 incrementing ' .. ARGV[2] .. ' by ' .. ARGV[3] .. ' leaves the signed 64-bit range')
  end
  return redis.error_reply('CSHM 9 the value of ' .. ARGV[2] .. ' is not an integer')
end
-- The stored digits, not tostring(r): Lua's numbers are doubles.
hold(ARGV[2])
if LISTENING then emit(1, ARGV[2], redis.call('GET', KEYS[1])) end
return r
"""
)

# KEYS: v i x l   ARGV: prefix member ttl_ms('' = no expiry)  -> 1 found
TOUCH = (
    _HEAD
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ttl = ARGV[3]
if ttl == '' then
  redis.call('PERSIST', KEYS[1]); redis.call('ZREM', KEYS[3], ARGV[2])
elseif tonumber(ttl) <= 0 then
  redis.call('UNLINK', KEYS[1]); forget(ARGV[2]); emit(2, ARGV[2])
else
  local dl = now + tonumber(ttl)
  redis.call('PEXPIREAT', KEYS[1], dl); redis.call('ZADD', KEYS[3], dl, ARGV[2]); hold(ARGV[2])
end
return 1
"""
)

# KEYS: v i x l   ARGV: prefix member  -> 1 if an expiry was removed
PERSIST = (
    _HEAD
    + """
local left = redis.call('PTTL', KEYS[1])
if left == 0 then
  -- Under a millisecond left: expired, as a read a moment later would find it.
  redis.call('UNLINK', KEYS[1]); forget(ARGV[2]); emit(3, ARGV[2]); return 0
end
if redis.call('PERSIST', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""
)

# KEYS: i x   ARGV: prefix key_prefix  -> [key...] (live, in key order)
KEYS = (
    _NOW
    + """
KEYS[3] = KEYS[2]; KEYS[2] = KEYS[1]
"""
    + _REAP
    + """
reap_all()
if ARGV[2] == '' then return redis.call('ZRANGE', KEYS[2], 0, -1) end
return redis.call('ZRANGEBYLEX', KEYS[2], '[' .. ARGV[2], '[' .. ARGV[2] .. '\\255')
"""
)

# KEYS: i x l   ARGV: prefix  -> how many keys were removed; -1: more to remove
# (1,000 keys a call: a huge namespace is cleared in steps, so that no call
# runs into busy-reply-threshold and blocks the server).
CLEAR = (
    _NOW
    + _EVENTS
    + """
KEYS[3] = KEYS[2]; KEYS[2] = KEYS[1]
"""
    + _REAP
    + """
reap(1000)
local batch = redis.call('ZRANGE', KEYS[2], 0, 999)
for _, m in ipairs(batch) do
  redis.call('UNLINK', ARGV[1] .. m)
  forget(m)
end
if redis.call('ZCARD', KEYS[2]) > 0 then return {#batch, 1} end
redis.call('UNLINK', KEYS[3])
emit(5)  -- once, when the namespace is empty
return {#batch, 0}
"""
)

# KEYS: i x l   ARGV: prefix cursor pattern count delete(0/1)  -> [cursor, keys or count]
SCAN = (
    _NOW
    + _EVENTS
    + """
KEYS[3] = KEYS[2]; KEYS[2] = KEYS[1]
"""
    + _REAP
    + """
reap(64)
local r = redis.call('ZSCAN', KEYS[2], ARGV[2], 'MATCH', ARGV[3], 'COUNT', ARGV[4])
local found = {}
local items = r[2]
for j = 1, #items, 2 do
  local m = items[j]
  if redis.call('EXISTS', ARGV[1] .. m) == 1 then
    if ARGV[5] == '1' then redis.call('UNLINK', ARGV[1] .. m); forget(m); emit(2, m) end
    found[#found + 1] = m
  else
    forget(m)
  end
end
if ARGV[5] == '1' then return {r[1], #found} end
return {r[1], found}
"""
)

# KEYS: i x   ARGV: prefix  -> live keys in the namespace (after a sweep)
COUNT = (
    _NOW
    + """
KEYS[3] = KEYS[2]; KEYS[2] = KEYS[1]
"""
    + _REAP
    + """
reap(1000)
return redis.call('ZCARD', KEYS[2])
"""
)

# -- locks ---------------------------------------------------------------------------------

# The lock's library. A waiter's entry in KEYS[3] is "place|wait_deadline|lease":
# place is the server time (ms) its place in the queue lasts until, min(its
# last ask + one heartbeat, its wait deadline); wait_deadline -1 is none.
# KEYS: h q w f
_LOCK_LIB = """
local function entry(tok)
  local w = redis.call('HGET', KEYS[3], tok)
  if not w then return nil end
  local place, wdl, lease = string.match(w, '^(-?%d+)|(-?%d+)|(%d+)$')
  return tonumber(place), tonumber(wdl), tonumber(lease)
end
-- The first waiter whose place has not run out (dead ones, and ones past
-- their wait, are dropped from the head on the way), with its wanted lease.
local function live_head()
  while true do
    local head = redis.call('LINDEX', KEYS[2], 0)
    if not head then return nil end
    local place, _wdl, lease = entry(head)
    if place and place > now then return head, lease end
    redis.call('LPOP', KEYS[2]); redis.call('HDEL', KEYS[3], head)
  end
end
local function leave(tok)
  redis.call('LREM', KEYS[2], 0, tok); redis.call('HDEL', KEYS[3], tok)
end
-- The lock is tok's now; its fence, as a decimal string (Lua would print a
-- 16-digit double in e-notation). A new counter starts at the server's time
-- in microseconds, above every fence given before, so it may expire (a day
-- after it started) without fences ever going back.
local function grant(tok, lease)
  local fence = redis.call('INCR', KEYS[4])
  if fence == 1 then
    fence = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', KEYS[4], fence, 'PX', 86400000)
  else
    fence = string.format('%d', fence)
  end
  redis.call('HSET', KEYS[1], 'tok', tok, 'fence', fence)
  redis.call('PEXPIRE', KEYS[1], lease)
  return fence
end
-- A release hands the lock straight to the first live waiter (no round trip
-- of the waiter's on the next holder's path) and posts its fence to the
-- waiter's mailbox, which it waits on with BLPOP. The grant's first lease is
-- at most one heartbeat: a waiter that died since its last heartbeat holds
-- the lock no longer than that (its live successor extends it at once).
-- Without a live waiter, the lock is free (0).
local function hand_over(base, hb)
  local head, wanted = live_head()
  if not head then
    redis.call('UNLINK', KEYS[1])
    return 0
  end
  local lease = hb
  if wanted and wanted < lease then lease = wanted end
  redis.call('LPOP', KEYS[2]); redis.call('HDEL', KEYS[3], head)
  local fence = grant(head, lease)
  local mb = base .. ':g:' .. head
  redis.call('RPUSH', mb, fence); redis.call('PEXPIRE', mb, hb * 2)
  return 1
end
"""

# KEYS: h q w f   ARGV: tok lease_ms wait heartbeat_ms base
#   wait: 'try' (no wait), 'forever', 'in:<ms>' (the first call of a timed
#   wait), 'at:<ms>' (later calls: the deadline the first call answered)
# -> {1, fence}: granted; {0, -1}: not granted (try) or timed out;
#    {0, wait_deadline or -1, ms until it, holder's pttl}: queued
LOCK_ACQUIRE = (
    _NOW
    + _LOCK_LIB
    + """
local tok, lease, wait, hb = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local holder = redis.call('HGET', KEYS[1], 'tok')
if holder == tok then
  redis.call('UNLINK', ARGV[5] .. ':g:' .. tok)
  return {1, redis.call('HGET', KEYS[1], 'fence')}
end
local queued, wdl = entry(tok)
if not queued then
  wdl = -1
  if string.sub(wait, 1, 3) == 'in:' then wdl = now + tonumber(string.sub(wait, 4))
  elseif string.sub(wait, 1, 3) == 'at:' then wdl = tonumber(string.sub(wait, 4))
  end
end
if not holder then
  local head = live_head()
  if (not head) or head == tok then
    if wait ~= 'try' and wdl >= 0 and wdl <= now then leave(tok); return {0, -1} end
    if head == tok then
      redis.call('LPOP', KEYS[2]); redis.call('HDEL', KEYS[3], tok)
      redis.call('UNLINK', ARGV[5] .. ':g:' .. tok)
    end
    return {1, grant(tok, lease)}
  end
end
if wait == 'try' then return {0, -1} end
if wdl >= 0 and wdl <= now then leave(tok); return {0, -1} end
local place = now + hb
if wdl >= 0 and wdl < place then place = wdl end
if not queued then redis.call('RPUSH', KEYS[2], tok) end
redis.call('HSET', KEYS[3], tok, string.format('%d|%d|%d', place, wdl, lease))
-- The queue's keys outlive their last live waiter by a little only (no stale
-- queue after a crash: redisson#4661).
redis.call('PEXPIRE', KEYS[2], hb * 3); redis.call('PEXPIRE', KEYS[3], hb * 3)
local left = -1
if wdl >= 0 then left = wdl - now end
return {0, wdl, left, redis.call('PTTL', KEYS[1])}
"""
)

# KEYS: h q w f   ARGV: tok base heartbeat_ms  -> -1 not owned, 1 handed to a waiter, 0 free
LOCK_RELEASE = (
    _NOW
    + _LOCK_LIB
    + """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return -1 end
return hand_over(ARGV[2], tonumber(ARGV[3]))
"""
)

# KEYS: h q w f   ARGV: tok base heartbeat_ms  -> 1 if it was still queued or held
# (a waiter that gives up: taken out of the queue; a grant that raced it, released)
LOCK_CANCEL = (
    _NOW
    + _LOCK_LIB
    + """
local queued = redis.call('HEXISTS', KEYS[3], ARGV[1])
leave(ARGV[1])
redis.call('UNLINK', ARGV[2] .. ':g:' .. ARGV[1])
if redis.call('HGET', KEYS[1], 'tok') == ARGV[1] then
  hand_over(ARGV[2], tonumber(ARGV[3]))
  return 1
end
return queued
"""
)

# KEYS: h   ARGV: tok lease_ms  -> 1 extended, 0 not owned
LOCK_EXTEND = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


# -- strict near caches (see .near) --------------------------------------------------------


def ack_key(namespace_key: bytes, ack_id) -> bytes:
    """Where the sessions a write told acknowledge it, ``{P|ns}#a:<id>``, from
    any of the namespace's two-character-suffixed keys (``#l``, ``#s``, ``#L``)."""
    return namespace_key[:-2] + b"#a:" + str(int(ack_id)).encode()


#: What a write script returns first when it told strict near caches (a NUL
#: byte: no script result starts so).
NEAR_MARK = b"\x00near"


def _with_near(source: str) -> str:
    """A write script whose result near_done() wraps: its body becomes a function."""
    head = _NOW + _EVENTS
    assert source.startswith(head), "a write script starts with _NOW + _EVENTS"
    body = source[len(head) :]
    return (
        head.replace("NEAR_MARK", "'\\0near'") + "local function body()\n" + body + "\nend\nreturn near_done(body())\n"
    )


SET, ADD, REPLACE, REMOVE = _with_near(SET), _with_near(ADD), _with_near(REPLACE), _with_near(REMOVE)
DELETE_MANY, SET_MANY, INCR = _with_near(DELETE_MANY), _with_near(SET_MANY), _with_near(INCR)
TOUCH, PERSIST, CLEAR, SCAN = _with_near(TOUCH), _with_near(PERSIST), _with_near(CLEAR), _with_near(SCAN)

# A strict near cache's miss. KEYS: {P|ns}#s   ARGV: value-key prefix, session,
# lease_ms, hold_ms, member...  -> [value or false, pttl, ...]. Renews the
# session's lease and records it as a holder of every key it found (the
# holder set lives hold_ms: the copy lives no longer, see .near).
NEAR_READ = (
    _NOW
    + """
local lease = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease * 3)
local tag = string.sub(KEYS[1], 1, -3)
local out = {}
for j = 5, #ARGV do
  local k = ARGV[1] .. ARGV[j]
  local v = redis.call('GET', k)
  if v then
    local h = tag .. '#h:' .. ARGV[j]
    redis.call('SADD', h, ARGV[2])
    redis.call('PEXPIRE', h, ARGV[4])
    out[#out + 1] = v
    out[#out + 1] = redis.call('PTTL', k)
  else
    out[#out + 1] = false
    out[#out + 1] = -2
  end
end
return out
"""
)

# A strict session's renewal. KEYS: {P|ns}#s (near caches) or {P|ns}#L
# (listeners)   ARGV: session, lease_ms
NEAR_RENEW = (
    _NOW
    + """
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease * 3)
return 1
"""
)

# An acknowledgement (a strict holder's or listener's). KEYS: {P|ns}#a:<id>  ARGV: session
NEAR_ACK = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], 30000)
return 1
"""
