"""The Redis job store shared by the gateway (asyncio) and the workers (threads).

Every state change is one Lua script, so a job record, its indexes, its queue entry and its event
stream never disagree, whichever process dies between two calls. The operations are written once,
as :class:`_Call` values (a script or command plus a parser), and run by two thin front ends:
:class:`JobStore` on a ``redis.Redis`` and :class:`AsyncJobStore` on a ``redis.asyncio.Redis``.

Keys (all under ``masactrl:``)::

    job:<id>                hash    the job record (fields below)
    job:<id>:events         stream  status / progress / terminal events; ids serve as SSE ids
    job:<id>:lease          string  worker id holding the job, with a TTL renewed by heartbeat
    tenant:<t>:jobs         zset    the tenant's job ids, score 0, so BYLEX order = UUIDv7 order
    queue:<model>           zset    queued job ids by enqueue time: depth and queue position
    running                 zset    running job ids by start time (janitor input)
    expiry                  zset    job ids by the time their record and results are removed
    inputs                  zset    content-addressed input keys by the time they may be removed
    idem:<t>:<sha256(key)>  string  "<body hash> <job id>", TTL = job retention
    ratelimit:<t>           hash    token bucket
    workers:<model>         zset    live worker ids by heartbeat deadline
    worker-models           set     models that ever had a worker

Some scripts build key names from record fields (the queue of a job's model, the jobs listed from
an index). That is fine on one Redis server or a replicated pair, which is what this service runs
on; it would need hash tags to run on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from masactrl_jobs.ids import new_id
from masactrl_jobs.schema import (
    JobError,
    JobInput,
    JobKind,
    JobMetrics,
    JobOutput,
    JobProgress,
    JobPublic,
    JobStatus,
    JobUrls,
    JobWebhook,
    OutputImage,
    WebhookCreate,
    WebhookDelivery,
)

__all__ = [
    "AsyncJobStore",
    "CancelResult",
    "CreateResult",
    "FinishResult",
    "JobEvent",
    "JobRecord",
    "JobStore",
    "Keys",
    "ProgressResult",
    "RateLimitResult",
    "StartResult",
    "TERMINAL_EVENTS",
]

T = TypeVar("T")

# Event names in a job's stream (and on the SSE wire).
STATUS_EVENT = "status"
PROGRESS_EVENT = "progress"
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "canceled"})

DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
# Redis deletes a finished job's keys this long after the sweeper should have: a safety net for a
# deployment that never runs the sweeper, late enough that the sweeper still sees the job id and
# removes the stored results first.
KEY_TTL_GRACE_SECONDS = 24 * 3600
# Events are throttled by the worker (a few per second); this bounds a runaway producer.
EVENTS_MAXLEN = 2000


class Keys:
    """Redis key names; one place so the gateway, workers and tests agree."""

    def __init__(self, prefix: str = "masactrl") -> None:
        self.prefix = prefix
        self.job_prefix = f"{prefix}:job:"
        self.queue_prefix = f"{prefix}:queue:"
        self.running = f"{prefix}:running"
        self.expiry = f"{prefix}:expiry"
        self.inputs = f"{prefix}:inputs"
        self.worker_models = f"{prefix}:worker-models"

    def job(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:events"

    def lease(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:lease"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def queue(self, model: str) -> str:
        return f"{self.queue_prefix}{model}"

    def idempotency(self, tenant: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}:idem:{tenant}:{digest}"

    def rate_limit(self, tenant: str) -> str:
        return f"{self.prefix}:ratelimit:{tenant}"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"


# --- Lua ----------------------------------------------------------------------------------------

_PRELUDE = """
local function xadd(stream, maxlen, event, data)
  return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', event, 'data', data)
end
-- Move a job to a terminal status and schedule its removal. st = {status, model, id, idem_key}.
local function finish(job, events, running, expiry, lease, st, status, now, expire_at, key_ttl,
                      idem_ttl, data, maxlen, queue_prefix, first_field)
  redis.call('HSET', job, 'status', status, 'completed_at', now)
  if first_field and #ARGV >= first_field then
    redis.call('HSET', job, unpack(ARGV, first_field))
  end
  redis.call('ZREM', queue_prefix .. st[2], st[3])
  redis.call('ZREM', running, st[3])
  redis.call('ZADD', expiry, expire_at, st[3])
  redis.call('DEL', lease)
  if st[4] and st[4] ~= '' then redis.call('EXPIRE', st[4], idem_ttl) end
  local id = xadd(events, maxlen, status, data)
  redis.call('EXPIRE', job, key_ttl)
  redis.call('EXPIRE', events, key_ttl)
  return id
end
-- Token bucket on Redis' clock (gateways need not agree on time). Returns allowed (0/1), the
-- seconds until `cost` tokens are available, and the tokens left.
local function take_token(bucket, rate, burst, cost)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local b = redis.call('HMGET', bucket, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  local allowed = 0
  local retry = 0
  if tokens >= cost then
    tokens = tokens - cost
    allowed = 1
  else
    retry = (cost - tokens) / rate
  end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', bucket, math.ceil(burst / rate) + 1)
  return allowed, retry, tokens
end
"""

# KEYS: job, events, tenant index, queue, expiry, inputs, idempotency, broker list, token bucket
# ARGV: 1 id, 2 queue score, 3 max depth, 4 use idem, 5 body hash, 6 idem ttl, 7 expire_at,
#       8 event data, 9 maxlen, 10 broker message ('' = none), 11 rate ('' = no limit), 12 burst,
#       13 inputs expire_at, 14 input keys (JSON list), 15 record fields (JSON object of strings)
# Few, large arguments: packing each argument costs the caller more than cjson costs Redis.
# The checks run cheapest-first and before any write: a replay or a refusal changes nothing.
_CREATE = """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {'duplicate', existing} end
end
local max_depth = tonumber(ARGV[3])
if max_depth > 0 and redis.call('ZCARD', KEYS[4]) >= max_depth then return {'full', ''} end
if ARGV[11] ~= '' then
  local allowed, retry = take_token(KEYS[9], tonumber(ARGV[11]), tonumber(ARGV[12]), 1)
  if allowed == 0 then return {'rate_limited', tostring(retry)} end
end
local flat = {}
for name, value in pairs(cjson.decode(ARGV[15])) do
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[1])
for _, key in ipairs(cjson.decode(ARGV[14])) do redis.call('ZADD', KEYS[6], 'GT', ARGV[13], key) end
if ARGV[4] == '1' then redis.call('SET', KEYS[7], ARGV[5] .. ' ' .. ARGV[1], 'EX', ARGV[6]) end
xadd(KEYS[2], ARGV[9], 'status', ARGV[8])
if ARGV[10] ~= '' then redis.call('LPUSH', KEYS[8], ARGV[10]) end
return {'created', tostring(redis.call('ZRANK', KEYS[4], ARGV[1]))}
"""

# KEYS: job. ARGV: queue prefix. Returns {} or {flat hash, queue rank or -1}.
_GET = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {} end
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id')
local rank = -1
if st[1] == 'queued' then
  local r = redis.call('ZRANK', ARGV[1] .. st[2], st[3])
  if r then rank = r end
end
return {h, rank}
"""

# KEYS: tenant index. ARGV: cursor ('' = newest), limit, status ('' = any), max scanned, job
# prefix, queue prefix. Returns {next cursor or '', {hash, rank}...}; ids of records that expired
# are dropped from the index on the way.
_LIST = """
local limit = tonumber(ARGV[2])
local max_scan = tonumber(ARGV[4])
local upper = '+'
if ARGV[1] ~= '' then upper = '(' .. ARGV[1] end
local out = {}
local scanned = 0
local last = nil
local exhausted = false
while #out < limit and scanned < max_scan do
  local ids = redis.call('ZRANGE', KEYS[1], upper, '-', 'BYLEX', 'REV', 'LIMIT', 0, 100)
  if #ids == 0 then exhausted = true break end
  for _, id in ipairs(ids) do
    scanned = scanned + 1
    last = id
    local key = ARGV[5] .. id
    local st = redis.call('HMGET', key, 'status', 'model')
    if not st[1] then
      redis.call('ZREM', KEYS[1], id)
    elseif ARGV[3] == '' or ARGV[3] == st[1] then
      local rank = -1
      if st[1] == 'queued' then
        local r = redis.call('ZRANK', ARGV[6] .. st[2], id)
        if r then rank = r end
      end
      table.insert(out, {redis.call('HGETALL', key), rank})
    end
    if #out >= limit or scanned >= max_scan then break end
  end
  upper = '(' .. last
end
local cursor = ''
if not exhausted and last then cursor = last end
local result = {cursor}
for _, item in ipairs(out) do table.insert(result, item) end
return result
"""

# KEYS: job, events, running. ARGV: now, now ms, worker id, maxlen, queue prefix.
_START = """
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'cancel_requested', 'started_at')
if not st[1] then return {'missing', ''} end
if st[1] ~= 'queued' and st[1] ~= 'running' then return {'terminal', st[1]} end
if st[4] == '1' then return {'cancel_requested', st[1]} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker_id', ARGV[3])
if not st[5] or st[5] == '' then redis.call('HSET', KEYS[1], 'started_at', ARGV[1]) end
redis.call('ZREM', ARGV[5] .. st[2], st[3])
redis.call('ZADD', KEYS[3], ARGV[2], st[3])
xadd(KEYS[2], ARGV[4], 'status',
     '{"status":"running","attempt":' .. attempts .. '}')
return {'started', tostring(attempts)}
"""

# KEYS: job, events. ARGV: progress json, maxlen. Returns {updated, cancel requested}.
_PROGRESS = """
local st = redis.call('HMGET', KEYS[1], 'status', 'cancel_requested')
if st[1] ~= 'running' then return {0, st[2] == '1' and 1 or 0} end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
xadd(KEYS[2], ARGV[2], 'progress', ARGV[1])
return {1, st[2] == '1' and 1 or 0}
"""

# KEYS: job, events, running, expiry, lease.
# ARGV: status, allowed ',a,b,', now, expire_at, key ttl, idem ttl, event data, maxlen,
#       queue prefix, <field value pairs from 10>
_FINISH = """
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'idem_key')
if not st[1] then return {'missing', ''} end
if not string.find(ARGV[2], ',' .. st[1] .. ',', 1, true) then return {'conflict', st[1]} end
finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], st, ARGV[1], ARGV[3], ARGV[4], ARGV[5],
       ARGV[6], ARGV[7], ARGV[8], ARGV[9], 10)
return {'ok', st[1]}
"""

# KEYS: as _FINISH. ARGV: now, expire_at, key ttl, idem ttl, event data, maxlen, queue prefix.
_CANCEL = """
local st = redis.call('HMGET', KEYS[1], 'status', 'model', 'id', 'idem_key', 'cancel_requested')
if not st[1] then return {'missing', ''} end
if st[1] == 'running' then
  if st[5] ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    xadd(KEYS[2], ARGV[6], 'status', '{"status":"running","cancel_requested":true}')
  end
  return {'flagged', st[1]}
end
if st[1] ~= 'queued' then return {'conflict', st[1]} end
finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], st, 'canceled', ARGV[1], ARGV[2], ARGV[3],
       ARGV[4], ARGV[5], ARGV[6], ARGV[7], nil)
return {'canceled', st[1]}
"""

# KEYS: bucket. ARGV: rate per second, burst, cost.
_RATE_LIMIT = """
local allowed, retry, tokens = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]),
                                          tonumber(ARGV[3]))
return {allowed, tostring(retry), tostring(tokens)}
"""

# KEYS: lease. ARGV: worker id, ttl ms.
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: worker id.
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: running. ARGV: started before (ms), limit, job prefix.
_STALE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[3] .. id .. ':lease') == 0 then table.insert(out, id) end
end
return out
"""

# KEYS: running, lease. ARGV: id, started before (ms), now ms. One janitor wins the claim.
_CLAIM_STALE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# KEYS: job. ARGV: delivery json line. Deliveries are JSON lines so appending never re-encodes.
_DELIVERY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local d = redis.call('HGET', KEYS[1], 'deliveries') or ''
redis.call('HSET', KEYS[1], 'deliveries', d .. ARGV[1] .. '\\n')
return 1
"""

# KEYS: workers zset, worker-models set. ARGV: worker id, deadline, model.
_REGISTER = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# KEYS: worker-models. ARGV: workers key prefix, now.
_LIVE_MODELS = """
local out = {}
for _, model in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. model
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
  if redis.call('ZCARD', key) > 0 then table.insert(out, model) end
end
return out
"""

# KEYS: queue zsets. Returns their sizes.
_DEPTHS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('ZCARD', key) end
return out
"""

# KEYS: expiry, running. ARGV: prefix, then job ids. Removes every trace of each job in Redis.
_PURGE = """
local prefix = ARGV[1]
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local job = prefix .. ':job:' .. id
  local st = redis.call('HMGET', job, 'tenant', 'model', 'idem_key')
  if st[1] then redis.call('ZREM', prefix .. ':tenant:' .. st[1] .. ':jobs', id) end
  if st[2] then redis.call('ZREM', prefix .. ':queue:' .. st[2], id) end
  if st[3] and st[3] ~= '' then redis.call('DEL', st[3]) end
  redis.call('DEL', job, job .. ':events', job .. ':lease')
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  n = n + 1
end
return n
"""

# KEYS: inputs. ARGV: now, keys... Removes and returns those still expired (a new job may have
# renewed one since it was listed).
_FORGET_INPUTS = """
local out = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    table.insert(out, ARGV[i])
  end
end
return out
"""

_SCRIPTS: dict[str, str] = {
    "create": _PRELUDE + _CREATE,
    "get": _GET,
    "list": _LIST,
    "start": _PRELUDE + _START,
    "progress": _PRELUDE + _PROGRESS,
    "finish": _PRELUDE + _FINISH,
    "cancel": _PRELUDE + _CANCEL,
    "rate_limit": _PRELUDE + _RATE_LIMIT,
    "lease_renew": _LEASE_RENEW,
    "lease_release": _LEASE_RELEASE,
    "stale": _STALE,
    "claim_stale": _CLAIM_STALE,
    "delivery": _DELIVERY,
    "register": _REGISTER,
    "live_models": _LIVE_MODELS,
    "depths": _DEPTHS,
    "purge": _PURGE,
    "forget_inputs": _FORGET_INPUTS,
}


# --- records and results --------------------------------------------------------------------


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_or_none(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


def _float_or_none(raw: str | None) -> float | None:
    return float(raw) if raw else None


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


# Built once: json.dumps with arguments builds a new encoder on every call.
_compact = json.JSONEncoder(separators=(",", ":")).encode
_compact_utf8 = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(value: Any) -> str:
    return _compact(value)


@dataclass
class JobRecord:
    """A job as stored: what the workers read and the gateway renders with :meth:`to_public`.

    ``output`` holds ``{"images": [{"role", "prompt", "key", "width", "height"}]}`` (keys, not
    URLs: URLs are presigned when the job is shown). ``webhook_secrets`` are the tenant's signing
    secrets at submission time (newest first); they never appear in the public object.
    """

    id: str
    tenant: str
    kind: JobKind
    model: str
    status: JobStatus
    created_at: float
    input: JobInput
    started_at: float | None = None
    completed_at: float | None = None
    progress: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    attempts: int = 0
    webhook: dict[str, Any] | None = None
    webhook_secrets: list[str] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False
    request_hash: str = ""
    worker_id: str | None = None
    queue_position: int | None = None

    @classmethod
    def from_hash(cls, raw: dict[Any, Any], rank: int = -1) -> JobRecord:
        """Parse a record from its Redis hash (and its 0-based queue rank, -1 when not queued)."""
        h = {_s(k): _s(v) for k, v in raw.items()}
        status = JobStatus(h["status"])
        deliveries = [json.loads(line) for line in h.get("deliveries", "").splitlines() if line]
        return cls(
            id=h["id"],
            tenant=h["tenant"],
            kind=JobKind(h["kind"]),
            model=h["model"],
            status=status,
            created_at=float(h["created_at"]),
            input=JobInput.model_validate_json(h["input"]),
            started_at=_float_or_none(h.get("started_at")),
            completed_at=_float_or_none(h.get("completed_at")),
            progress=_json_or_none(h.get("progress")),
            output=_json_or_none(h.get("output")),
            error=_json_or_none(h.get("error")),
            metrics=_json_or_none(h.get("metrics")),
            attempts=int(h.get("attempts") or 0),
            webhook=_json_or_none(h.get("webhook")),
            webhook_secrets=_json_or_none(h.get("webhook_secrets")) or [],
            deliveries=deliveries,
            cancel_requested=h.get("cancel_requested") == "1",
            request_hash=h.get("request_hash", ""),
            worker_id=h.get("worker_id") or None,
            queue_position=rank + 1 if status is JobStatus.queued and rank >= 0 else None,
        )

    @property
    def input_keys(self) -> list[str]:
        """Every storage key this job reads: the image and any mask images."""
        keys = [self.input.image] if self.input.image else []
        for region in self.input.control.mask.regions or []:
            keys += [region.source, region.target]
        return keys

    def to_public(
        self,
        *,
        base_url: str,
        url_for: Callable[[str], str],
        url_ttl_seconds: int,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        now: float | None = None,
    ) -> JobPublic:
        """The job object: output keys become presigned URLs made by ``url_for(key)``."""
        now = time.time() if now is None else now
        base = base_url.rstrip("/")
        progress = None
        if self.progress:
            total = max(int(self.progress.get("total", 0)), 1)
            progress = JobProgress(
                phase=self.progress["phase"],
                step=self.progress["step"],
                total=self.progress["total"],
                fraction=min(1.0, round(int(self.progress["step"]) / total, 4)),
            )
        output = None
        if self.output is not None:
            expires = now + url_ttl_seconds
            if self.completed_at is not None:
                expires = min(expires, self.completed_at + retention_seconds)
            output = JobOutput(
                images=[
                    OutputImage(url=url_for(image["key"]), **image)
                    for image in self.output.get("images", [])
                ],
                expires_at=_dt(expires),
            )
        metrics = dict(self.metrics or {})
        if self.started_at is not None:
            metrics.setdefault("queue_seconds", round(self.started_at - self.created_at, 3))
        if self.completed_at is not None:
            metrics.setdefault("total_seconds", round(self.completed_at - self.created_at, 3))
        webhook = None
        if self.webhook:
            webhook = JobWebhook(
                url=self.webhook["url"],
                events=self.webhook["events"],
                deliveries=[WebhookDelivery.model_validate(d) for d in self.deliveries],
            )
        # Constructed, not validated: every value comes from this record, which was validated on
        # the way in; this runs for every job shown, so the saved validation is worth having.
        return JobPublic.model_construct(
            id=self.id,
            kind=self.kind,
            status=self.status,
            created_at=_dt(self.created_at),
            started_at=_dt(self.started_at),
            completed_at=_dt(self.completed_at),
            model=self.model,
            input=self.input,
            queue_position=self.queue_position,
            progress=progress,
            output=output,
            error=JobError.model_validate(self.error) if self.error else None,
            metrics=JobMetrics.model_validate(metrics) if metrics else None,
            attempts=self.attempts,
            webhook=webhook,
            urls=JobUrls.model_construct(
                self_=f"{base}/v1/jobs/{self.id}",
                cancel=f"{base}/v1/jobs/{self.id}/cancel",
                events=f"{base}/v1/jobs/{self.id}/events",
            ),
        )


@dataclass(frozen=True)
class CreateResult:
    """``outcome``: ``created``; ``duplicate`` (idempotency key seen: ``job_id`` is the original,
    ``request_hash`` its body hash); ``full`` (the model's queue is at its limit); or
    ``rate_limited`` (the tenant's bucket is empty: retry in ``retry_after`` seconds)."""

    outcome: str
    job_id: str | None = None
    request_hash: str | None = None
    record: JobRecord | None = None
    retry_after: float = 0.0


@dataclass(frozen=True)
class StartResult:
    """``outcome``: ``started`` (run it; ``attempts`` counts this run), ``missing`` (no such
    job: expired or never created), ``terminal`` (already ended: drop the message) or
    ``cancel_requested`` (cancelled while running elsewhere: call ``finish_canceled``)."""

    outcome: str
    attempts: int = 0
    status: str | None = None

    @property
    def should_run(self) -> bool:
        return self.outcome == "started"


@dataclass(frozen=True)
class ProgressResult:
    updated: bool
    cancel_requested: bool


@dataclass(frozen=True)
class FinishResult:
    """``outcome``: ``ok``, ``missing`` or ``conflict`` (``previous`` says the status found)."""

    outcome: str
    previous: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class CancelResult:
    """``outcome``: ``canceled`` (was queued), ``flagged`` (running: the worker stops at its next
    step), ``conflict`` (already terminal; ``previous`` is its status) or ``missing``."""

    outcome: str
    previous: str | None = None


@dataclass(frozen=True)
class RateLimitResult:
    allowed: bool
    retry_after: float
    remaining: float


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream; ``id`` is the stream id, usable as an SSE id."""

    id: str
    event: str
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


# --- operations, written once -----------------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """A script (by name) or a raw command, and how to read its reply."""

    script: str | None
    keys: Sequence[str]
    args: Sequence[Any]
    parse: Callable[[Any], T]


def _pairs(values: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        out += [key, value if isinstance(value, str) else _dumps(value)]
    return out


def _pack(chunks: list[bytes], args: Sequence[Any]) -> None:
    """Append one command in RESP (an array of bulk strings) to ``chunks``."""
    append = chunks.append
    append(b"*%d\r\n" % len(args))
    for arg in args:
        kind = type(arg)  # exact types first: this runs for every argument of every call
        if kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        append(b"$%d\r\n%s\r\n" % (len(data), data))


def _strings(values: dict[str, Any]) -> dict[str, str]:
    """Hash fields as strings (JSON for structures); None values are left out."""
    return {
        key: value if isinstance(value, str) else _dumps(value)
        for key, value in values.items()
        if value is not None
    }


def _flat_to_dict(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


def _parse_events(reply: Any) -> list[JobEvent]:
    events: list[JobEvent] = []
    if not reply:
        return events
    streams = reply.items() if isinstance(reply, dict) else reply
    for _name, entries in streams:
        for entry_id, fields in entries:
            f = {_s(k): _s(v) for k, v in fields.items()}
            events.append(
                JobEvent(_s(entry_id), f.get("event", ""), json.loads(f.get("data", "{}")))
            )
    return events


class _Ops:
    """Builds every :class:`_Call`; holds the configuration both front ends share."""

    def __init__(self, keys: Keys, retention_seconds: int, events_maxlen: int) -> None:
        self.keys = keys
        self.retention = int(retention_seconds)
        self.maxlen = events_maxlen

    # -- jobs
    def create(
        self,
        *,
        tenant: str,
        kind: JobKind,
        model: str,
        input: JobInput,
        request_hash: str,
        idempotency_key: str | None,
        max_queue_depth: int,
        webhook: WebhookCreate | None,
        webhook_secrets: Sequence[str],
        job_id: str | None,
        now: float | None,
        message: tuple[str, str] | None = None,
        rate_limit: tuple[float, float] | None = None,
    ) -> _Call[CreateResult]:
        k = self.keys
        job_id = job_id or new_id()
        now = time.time() if now is None else now
        idem_key = k.idempotency(tenant, idempotency_key) if idempotency_key else ""
        record = JobRecord(
            id=job_id,
            tenant=tenant,
            kind=kind,
            model=model,
            status=JobStatus.queued,
            created_at=now,
            input=input,
            webhook=webhook.model_dump(mode="json") if webhook else None,
            webhook_secrets=list(webhook_secrets) if webhook else [],
            request_hash=request_hash,
        )
        fields = _strings(
            {
                "id": job_id,
                "tenant": tenant,
                "kind": kind.value,
                "model": model,
                "status": JobStatus.queued.value,
                "created_at": repr(now),
                "input": input.model_dump_json(),
                "attempts": "0",
                "webhook": record.webhook,
                "webhook_secrets": record.webhook_secrets or None,
                "request_hash": request_hash,
                "idem_key": idem_key or None,
            }
        )
        input_keys = record.input_keys
        expire_at = now + self.retention
        args = [
            job_id,
            int(now * 1000),
            max(int(max_queue_depth), 0),
            "1" if idem_key else "0",
            request_hash,
            self.retention,
            expire_at,
            '{"status":"queued"}',
            self.maxlen,
            message[1] if message else "",
            rate_limit[0] if rate_limit else "",
            rate_limit[1] if rate_limit else "",
            expire_at,
            _dumps(input_keys) if input_keys else "[]",
            _compact_utf8(fields),
        ]
        keys = [
            k.job(job_id),
            k.events(job_id),
            k.tenant_jobs(tenant),
            k.queue(model),
            k.expiry,
            k.inputs,
            idem_key or k.idempotency(tenant, ""),
            # The broker list is Celery's (kombu's Redis transport), named after the queue.
            message[0] if message else k.queue(model),
            k.rate_limit(tenant),
        ]

        def parse(reply: Any) -> CreateResult:
            outcome, value = _s(reply[0]), _s(reply[1])
            if outcome == "duplicate":
                body_hash, _, original = value.partition(" ")
                return CreateResult("duplicate", job_id=original, request_hash=body_hash)
            if outcome == "full":
                return CreateResult("full")
            if outcome == "rate_limited":
                return CreateResult("rate_limited", retry_after=float(value))
            record.queue_position = int(value) + 1
            return CreateResult("created", job_id=job_id, request_hash=request_hash, record=record)

        return _Call("create", keys, args, parse)

    def get(self, job_id: str) -> _Call[JobRecord | None]:
        def parse(reply: Any) -> JobRecord | None:
            if not reply:
                return None
            return JobRecord.from_hash(_flat_to_dict(reply[0]), int(reply[1]))

        return _Call("get", [self.keys.job(job_id)], [self.keys.queue_prefix], parse)

    def list(
        self, tenant: str, *, status: JobStatus | None, limit: int, cursor: str | None
    ) -> _Call[tuple[list[JobRecord], str | None]]:
        def parse(reply: Any) -> tuple[list[JobRecord], str | None]:
            cursor_out = _s(reply[0]) or None
            records = [JobRecord.from_hash(_flat_to_dict(h), int(r)) for h, r in reply[1:]]
            return records, cursor_out

        args = [
            cursor or "",
            max(1, int(limit)),
            status.value if status else "",
            # Bounds the work a filtered listing does per call; the cursor carries on from there.
            max(1000, int(limit) * 10),
            self.keys.job_prefix,
            self.keys.queue_prefix,
        ]
        return _Call("list", [self.keys.tenant_jobs(tenant)], args, parse)

    def cancel(self, job_id: str, now: float | None) -> _Call[CancelResult]:
        k = self.keys
        now = time.time() if now is None else now
        args = [
            repr(now),
            now + self.retention,
            self.retention + KEY_TTL_GRACE_SECONDS,
            self.retention,
            '{"status":"canceled"}',
            self.maxlen,
            k.queue_prefix,
        ]
        keys = [k.job(job_id), k.events(job_id), k.running, k.expiry, k.lease(job_id)]
        return _Call("cancel", keys, args, lambda r: CancelResult(_s(r[0]), _s(r[1]) or None))

    def start(self, job_id: str, worker_id: str, now: float | None) -> _Call[StartResult]:
        k = self.keys
        now = time.time() if now is None else now

        def parse(reply: Any) -> StartResult:
            outcome, value = _s(reply[0]), _s(reply[1])
            if outcome == "started":
                return StartResult(outcome, attempts=int(value), status="running")
            return StartResult(outcome, status=value or None)

        args = [repr(now), int(now * 1000), worker_id, self.maxlen, k.queue_prefix]
        return _Call("start", [k.job(job_id), k.events(job_id), k.running], args, parse)

    def progress(self, job_id: str, phase: str, step: int, total: int) -> _Call[ProgressResult]:
        total = max(int(total), 1)
        data = {
            "phase": phase,
            "step": int(step),
            "total": total,
            "fraction": round(min(1.0, int(step) / total), 4),
        }
        return _Call(
            "progress",
            [self.keys.job(job_id), self.keys.events(job_id)],
            [_dumps(data), self.maxlen],
            lambda r: ProgressResult(bool(int(r[0])), bool(int(r[1]))),
        )

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        allowed_from: Iterable[JobStatus],
        fields: dict[str, Any],
        event: dict[str, Any],
        now: float | None,
    ) -> _Call[FinishResult]:
        k = self.keys
        now = time.time() if now is None else now
        allowed = "," + ",".join(s.value for s in allowed_from) + ","
        args = [
            status.value,
            allowed,
            repr(now),
            now + self.retention,
            self.retention + KEY_TTL_GRACE_SECONDS,
            self.retention,
            _dumps({"status": status.value, **event}),
            self.maxlen,
            k.queue_prefix,
            *_pairs(fields),
        ]
        keys = [k.job(job_id), k.events(job_id), k.running, k.expiry, k.lease(job_id)]
        return _Call("finish", keys, args, lambda r: FinishResult(_s(r[0]), _s(r[1]) or None))

    def read_events(self, job_id: str, after: str, count: int) -> _Call[list[JobEvent]]:
        args = ["XRANGE", self.keys.events(job_id), f"({after}" if after != "0" else "-", "+"]
        args += ["COUNT", count]
        return _Call(None, [], args, lambda r: _parse_events([("s", r or [])]))

    # -- limits and queues
    def rate_limit(self, tenant: str, rate: float, burst: float, cost: float) -> _Call[Any]:
        return _Call(
            "rate_limit",
            [self.keys.rate_limit(tenant)],
            [rate, burst, cost],
            lambda r: RateLimitResult(bool(int(r[0])), float(_s(r[1])), float(_s(r[2]))),
        )

    def queue_depths(self, models: Sequence[str]) -> _Call[dict[str, int]]:
        models = list(models)
        return _Call(
            "depths",
            [self.keys.queue(m) for m in models],
            [],
            lambda r: {m: int(n) for m, n in zip(models, r or [], strict=True)},
        )

    # -- leases and workers
    def acquire_lease(self, job_id: str, worker_id: str, ttl: float) -> _Call[bool]:
        args = ["SET", self.keys.lease(job_id), worker_id, "NX", "PX", int(ttl * 1000)]
        return _Call(None, [], args, bool)

    def renew_lease(self, job_id: str, worker_id: str, ttl: float) -> _Call[bool]:
        return _Call(
            "lease_renew",
            [self.keys.lease(job_id)],
            [worker_id, int(ttl * 1000)],
            lambda r: bool(int(r)),
        )

    def release_lease(self, job_id: str, worker_id: str) -> _Call[bool]:
        return _Call(
            "lease_release", [self.keys.lease(job_id)], [worker_id], lambda r: bool(int(r))
        )

    def lease_owner(self, job_id: str) -> _Call[str | None]:
        return _Call(None, [], ["GET", self.keys.lease(job_id)], lambda r: _s(r) if r else None)

    def stale_running(self, older_than: float, limit: int, now: float | None) -> _Call[list[str]]:
        now = time.time() if now is None else now
        cutoff = int((now - older_than) * 1000)
        return _Call(
            "stale",
            [self.keys.running],
            [cutoff, int(limit), self.keys.job_prefix],
            lambda r: [_s(x) for x in r],
        )

    def claim_stale(self, job_id: str, older_than: float, now: float | None) -> _Call[bool]:
        now = time.time() if now is None else now
        return _Call(
            "claim_stale",
            [self.keys.running, self.keys.lease(job_id)],
            [job_id, int((now - older_than) * 1000), int(now * 1000)],
            lambda r: bool(int(r)),
        )

    def cancel_requested(self, job_id: str) -> _Call[bool]:
        args = ["HGET", self.keys.job(job_id), "cancel_requested"]
        return _Call(None, [], args, lambda r: r is not None and _s(r) == "1")

    def record_delivery(self, job_id: str, delivery: dict[str, Any]) -> _Call[bool]:
        return _Call(
            "delivery", [self.keys.job(job_id)], [_dumps(delivery)], lambda r: bool(int(r))
        )

    def register_worker(self, model: str, worker_id: str, ttl: float) -> _Call[bool]:
        return _Call(
            "register",
            [self.keys.workers(model), self.keys.worker_models],
            [worker_id, time.time() + ttl, model],
            lambda r: True,
        )

    def unregister_worker(self, model: str, worker_id: str) -> _Call[bool]:
        args = ["ZREM", self.keys.workers(model), worker_id]
        return _Call(None, [], args, lambda r: bool(int(r)))

    def live_models(self) -> _Call[set[str]]:
        return _Call(
            "live_models",
            [self.keys.worker_models],
            [f"{self.keys.prefix}:workers:", time.time()],
            lambda r: {_s(x) for x in r},
        )

    # -- idempotency and retention
    def idempotency(self, tenant: str, key: str) -> _Call[tuple[str, str] | None]:
        def parse(reply: Any) -> tuple[str, str] | None:
            if not reply:
                return None
            body_hash, _, job_id = _s(reply).partition(" ")
            return body_hash, job_id

        return _Call(None, [], ["GET", self.keys.idempotency(tenant, key)], parse)

    def expired_jobs(self, now: float | None, limit: int) -> _Call[list[str]]:
        now = time.time() if now is None else now
        args = ["ZRANGEBYSCORE", self.keys.expiry, "-inf", now, "LIMIT", 0, int(limit)]
        return _Call(None, [], args, lambda r: [_s(x) for x in r])

    def purge_jobs(self, job_ids: Sequence[str]) -> _Call[int]:
        return _Call(
            "purge",
            [self.keys.expiry, self.keys.running],
            [self.keys.prefix, *job_ids],
            int,
        )

    def expired_inputs(self, now: float | None, limit: int) -> _Call[list[str]]:
        now = time.time() if now is None else now
        args = ["ZRANGEBYSCORE", self.keys.inputs, "-inf", now, "LIMIT", 0, int(limit)]
        return _Call(None, [], args, lambda r: [_s(x) for x in r])

    def forget_inputs(self, keys: Sequence[str], now: float | None) -> _Call[list[str]]:
        now = time.time() if now is None else now
        return _Call(
            "forget_inputs", [self.keys.inputs], [now, *keys], lambda r: [_s(x) for x in r]
        )


_PING = _Call(None, [], ["PING"], lambda r: True)


def _client_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Fail fast: a caller waiting on an unreachable Redis should get a 503 in well under a second
    # or two, not after redis-py's default retries with backoff.
    defaults: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 1.0,
        "socket_timeout": 5.0,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
    }
    defaults.update(kwargs)
    return defaults


class _Front:
    def __init__(
        self,
        client: Any,
        *,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        prefix: str = "masactrl",
        events_maxlen: int = EVENTS_MAXLEN,
    ) -> None:
        self.redis = client
        self.keys = Keys(prefix)
        self.retention_seconds = int(retention_seconds)
        self._ops = _Ops(self.keys, retention_seconds, events_maxlen)
        self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}


class JobStore(_Front):
    """The job store for synchronous callers (Celery workers, janitors, tests, tools)."""

    @classmethod
    def from_url(
        cls, url: str, *, retention_seconds: int = DEFAULT_RETENTION_SECONDS, **redis_kwargs: Any
    ) -> JobStore:
        """A store on its own connection pool (responses decoded, short timeouts)."""
        client = redis.Redis.from_url(url, **_client_kwargs(redis_kwargs))
        return cls(client, retention_seconds=retention_seconds)

    def _run(self, call: _Call[T]) -> T:
        if call.script is None:
            return call.parse(self.redis.execute_command(*call.args))
        script = self._scripts[call.script]
        return call.parse(script(keys=list(call.keys), args=list(call.args), client=self.redis))

    def close(self) -> None:
        self.redis.close()

    def ping(self) -> bool:
        """Whether Redis answers (raises redis.ConnectionError when it is unreachable)."""
        return self._run(_PING)

    # jobs
    def create(
        self,
        *,
        tenant: str,
        kind: JobKind,
        model: str,
        input: JobInput,
        request_hash: str = "",
        idempotency_key: str | None = None,
        max_queue_depth: int = 0,
        webhook: WebhookCreate | None = None,
        webhook_secrets: Sequence[str] = (),
        job_id: str | None = None,
        now: float | None = None,
        message: tuple[str, str] | None = None,
        rate_limit: tuple[float, float] | None = None,
    ) -> CreateResult:
        """Record a queued job, atomically with its idempotency record and queue-depth check.

        ``message`` (broker list, message text; see ``queue.TaskMessages``) is pushed in the same
        step; ``rate_limit`` (rate, burst) takes a token from the tenant's bucket first.
        """
        return self._run(
            self._ops.create(
                tenant=tenant,
                kind=kind,
                model=model,
                input=input,
                request_hash=request_hash,
                idempotency_key=idempotency_key,
                max_queue_depth=max_queue_depth,
                webhook=webhook,
                webhook_secrets=webhook_secrets,
                job_id=job_id,
                now=now,
                message=message,
                rate_limit=rate_limit,
            )
        )

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when it does not exist (or has expired)."""
        return self._run(self._ops.get(job_id))

    def list(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """A tenant's jobs, newest first, and the cursor of the next page (None at the end)."""
        return self._run(self._ops.list(tenant, status=status, limit=limit, cursor=cursor))

    def cancel(self, job_id: str, now: float | None = None) -> CancelResult:
        """Cancel a queued job at once, or flag a running one for its worker."""
        return self._run(self._ops.cancel(job_id, now))

    def start(self, job_id: str, worker_id: str, now: float | None = None) -> StartResult:
        """queued (or running with an expired lease) -> running, counting the attempt."""
        return self._run(self._ops.start(job_id, worker_id, now))

    def progress(self, job_id: str, phase: str, step: int, total: int) -> ProgressResult:
        """Record progress of a running job; also says whether cancellation was requested."""
        return self._run(self._ops.progress(job_id, phase, step, total))

    def succeed(
        self,
        job_id: str,
        images: Sequence[dict[str, Any]],
        metrics: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> FinishResult:
        """running -> succeeded with output images ``{role, prompt, key, width, height}``."""
        fields = {"output": {"images": list(images)}, "metrics": metrics}
        return self._run(
            self._ops.finish(job_id, JobStatus.succeeded, [JobStatus.running], fields, {}, now)
        )

    def fail(
        self,
        job_id: str,
        code: str,
        message: str,
        metrics: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> FinishResult:
        """queued|running -> failed with ``{code, message}``."""
        error = {"code": code, "message": message}
        return self._run(
            self._ops.finish(
                job_id,
                JobStatus.failed,
                [JobStatus.queued, JobStatus.running],
                {"error": error, "metrics": metrics},
                {"error": error},
                now,
            )
        )

    def finish_canceled(
        self, job_id: str, metrics: dict[str, Any] | None = None, now: float | None = None
    ) -> FinishResult:
        """running -> canceled, for the worker that stopped on the cancel flag."""
        return self._run(
            self._ops.finish(
                job_id, JobStatus.canceled, [JobStatus.running], {"metrics": metrics}, {}, now
            )
        )

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a client asked to cancel this (running) job."""
        return self._run(self._ops.cancel_requested(job_id))

    def read_events(self, job_id: str, after: str = "0", count: int = 100) -> list[JobEvent]:
        """Events after the stream id ``after`` ("0" = from the start), without blocking."""
        return self._run(self._ops.read_events(job_id, after, count))

    def wait_events(
        self, job_id: str, after: str = "$", block_ms: int = 1000, count: int = 100
    ) -> list[JobEvent]:
        """Events after ``after``, waiting up to ``block_ms`` for the first one ("$" = new only)."""
        reply = self.redis.xread({self.keys.events(job_id): after}, count=count, block=block_ms)
        return _parse_events(reply)

    def record_delivery(self, job_id: str, delivery: dict[str, Any]) -> bool:
        """Append one webhook delivery attempt ``{event, attempt, at, status_code, error,
        duration_ms}`` to the job; False when the job no longer exists."""
        return self._run(self._ops.record_delivery(job_id, delivery))

    # limits and queues
    def rate_limit(
        self, tenant: str, rate: float, burst: float, cost: float = 1
    ) -> RateLimitResult:
        """Take ``cost`` tokens from the tenant's bucket (``rate`` per second, up to ``burst``)."""
        return self._run(self._ops.rate_limit(tenant, rate, burst, cost))

    def queue_depths(self, models: Sequence[str]) -> dict[str, int]:
        """Queued jobs per model."""
        return self._run(self._ops.queue_depths(models))

    def idempotency(self, tenant: str, key: str) -> tuple[str, str] | None:
        """``(request hash, job id)`` recorded for this tenant's Idempotency-Key, if any."""
        return self._run(self._ops.idempotency(tenant, key))

    # leases and workers
    def acquire_lease(self, job_id: str, worker_id: str, ttl: float) -> bool:
        """Take the job's lease for ``ttl`` seconds; False when another worker holds it."""
        return self._run(self._ops.acquire_lease(job_id, worker_id, ttl))

    def renew_lease(self, job_id: str, worker_id: str, ttl: float) -> bool:
        """Extend our lease; False when it expired or another worker took it (stop the job)."""
        return self._run(self._ops.renew_lease(job_id, worker_id, ttl))

    def release_lease(self, job_id: str, worker_id: str) -> bool:
        """Drop our lease (a terminal transition also drops it)."""
        return self._run(self._ops.release_lease(job_id, worker_id))

    def lease_owner(self, job_id: str) -> str | None:
        """The worker id holding the job's lease, if any."""
        return self._run(self._ops.lease_owner(job_id))

    def stale_running(
        self, older_than: float, limit: int = 1000, now: float | None = None
    ) -> list[str]:
        """Running jobs started (or claimed) over ``older_than`` s ago whose lease has lapsed."""
        return self._run(self._ops.stale_running(older_than, limit, now))

    def claim_stale(self, job_id: str, older_than: float, now: float | None = None) -> bool:
        """Claim a stale job for re-enqueueing; only one janitor wins within ``older_than``."""
        return self._run(self._ops.claim_stale(job_id, older_than, now))

    def register_worker(self, model: str, worker_id: str, ttl: float) -> bool:
        """Heartbeat: the worker serves ``model`` for the next ``ttl`` seconds."""
        return self._run(self._ops.register_worker(model, worker_id, ttl))

    def unregister_worker(self, model: str, worker_id: str) -> bool:
        """Remove the worker at a clean shutdown."""
        return self._run(self._ops.unregister_worker(model, worker_id))

    def live_models(self) -> set[str]:
        """Models with at least one worker whose heartbeat has not lapsed."""
        return self._run(self._ops.live_models())

    # retention
    def expired_jobs(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Jobs past retention; delete their ``results/<id>/`` then call :meth:`purge_jobs`."""
        return self._run(self._ops.expired_jobs(now, limit))

    def purge_jobs(self, job_ids: Sequence[str]) -> int:
        """Remove every Redis trace of the jobs."""
        return self._run(self._ops.purge_jobs(job_ids)) if job_ids else 0

    def expired_inputs(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Input keys no job has used within retention."""
        return self._run(self._ops.expired_inputs(now, limit))

    def forget_inputs(self, keys: Sequence[str], now: float | None = None) -> list[str]:
        """Drop the still-expired keys from the index and return them (delete those objects)."""
        return self._run(self._ops.forget_inputs(keys, now)) if keys else []


class AsyncJobStore(_Front):
    """The same store for asyncio callers (the gateway); see :class:`JobStore` for each method."""

    @classmethod
    def from_url(
        cls, url: str, *, retention_seconds: int = DEFAULT_RETENTION_SECONDS, **redis_kwargs: Any
    ) -> AsyncJobStore:
        """A store on its own connection pool (responses decoded, short timeouts)."""
        client = redis.asyncio.Redis.from_url(url, **_client_kwargs(redis_kwargs))
        return cls(client, retention_seconds=retention_seconds)

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._pending: list[tuple[_Call[Any], asyncio.Future[Any]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def _run(self, call: _Call[T]) -> T:
        if call.script is None:
            return call.parse(await self.redis.execute_command(*call.args))
        # Automatic pipelining: script calls made by all the requests a loop iteration runs go
        # to Redis as one pipeline. redis-py spends far more CPU per command than Redis does, so
        # under load this is most of a submission's cost saved; alone, a call goes out as is.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._flushing.add(task)  # a strong reference until it is done
        task.add_done_callback(self._flushing.discard)

    async def _run_one(self, call: _Call[Any], future: asyncio.Future[Any]) -> None:
        try:
            script = self._scripts[call.script]  # type: ignore[index]
            reply = await script(keys=list(call.keys), args=list(call.args), client=self.redis)
            result = call.parse(reply)
        except BaseException as exc:  # handed to the caller, whatever it is
            if not future.done():
                future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not future.done():
                future.set_result(result)

    async def _send(self, batch: list[tuple[_Call[Any], asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            await self._run_one(*batch[0])
            return
        try:
            replies = await self._pipeline(batch)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (call, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                # Redis restarted or was flushed: this call loads the script and runs again.
                await self._run_one(call, future)
            elif future.done():
                continue  # the caller went away (request cancelled)
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                try:
                    future.set_result(call.parse(reply))
                except Exception as exc:
                    future.set_exception(exc)

    async def _pipeline(self, batch: list[tuple[_Call[Any], asyncio.Future[Any]]]) -> list[Any]:
        """EVALSHA every call in one write, then read the replies in order.

        The commands are packed here (RESP is a stable, tiny format) rather than by redis-py's
        pipeline, whose per-argument encoding was the largest single cost of a submission; the
        connection, its parser and error replies are redis-py's own.
        """
        chunks: list[bytes] = []
        for call, _ in batch:
            sha = self._scripts[call.script].sha  # type: ignore[index]
            _pack(chunks, ("EVALSHA", sha, len(call.keys), *call.keys, *call.args))
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(b"".join(chunks))
            replies: list[Any] = []
            # One read timeout for the whole batch (its replies arrive together) instead of a
            # timeout context per reply; math.inf tells redis-py to set none of its own.
            async with asyncio.timeout(connection.socket_timeout):
                for _ in batch:
                    try:
                        replies.append(await connection.read_response(timeout=math.inf))
                    except redis.exceptions.ResponseError as exc:
                        replies.append(exc)
        except TimeoutError:
            await connection.disconnect()
            raise redis.exceptions.TimeoutError("Timeout reading from Redis") from None
        except BaseException:
            # Unread replies would desynchronise the connection for its next user.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return replies

    async def close(self) -> None:
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        await self.redis.aclose()

    async def ping(self) -> bool:
        return await self._run(_PING)

    async def create(
        self,
        *,
        tenant: str,
        kind: JobKind,
        model: str,
        input: JobInput,
        request_hash: str = "",
        idempotency_key: str | None = None,
        max_queue_depth: int = 0,
        webhook: WebhookCreate | None = None,
        webhook_secrets: Sequence[str] = (),
        job_id: str | None = None,
        now: float | None = None,
        message: tuple[str, str] | None = None,
        rate_limit: tuple[float, float] | None = None,
    ) -> CreateResult:
        return await self._run(
            self._ops.create(
                tenant=tenant,
                kind=kind,
                model=model,
                input=input,
                request_hash=request_hash,
                idempotency_key=idempotency_key,
                max_queue_depth=max_queue_depth,
                webhook=webhook,
                webhook_secrets=webhook_secrets,
                job_id=job_id,
                now=now,
                message=message,
                rate_limit=rate_limit,
            )
        )

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._run(self._ops.get(job_id))

    async def list(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        return await self._run(self._ops.list(tenant, status=status, limit=limit, cursor=cursor))

    async def cancel(self, job_id: str, now: float | None = None) -> CancelResult:
        return await self._run(self._ops.cancel(job_id, now))

    async def fail(self, job_id: str, code: str, message: str) -> FinishResult:
        error = {"code": code, "message": message}
        return await self._run(
            self._ops.finish(
                job_id,
                JobStatus.failed,
                [JobStatus.queued, JobStatus.running],
                {"error": error},
                {"error": error},
                None,
            )
        )

    async def read_events(self, job_id: str, after: str = "0", count: int = 100) -> list[JobEvent]:
        return await self._run(self._ops.read_events(job_id, after, count))

    async def wait_events(
        self, job_id: str, after: str = "$", block_ms: int = 1000, count: int = 100
    ) -> list[JobEvent]:
        """Events after ``after``, waiting up to ``block_ms`` for the first one ("$" = new only)."""
        reply = await self.redis.xread(
            {self.keys.events(job_id): after}, count=count, block=block_ms
        )
        return _parse_events(reply)

    async def last_event_id(self, job_id: str) -> str:
        """The newest stream id of the job's events ("0" when there are none)."""
        entries = await self.redis.xrevrange(self.keys.events(job_id), count=1)
        return _s(entries[0][0]) if entries else "0"

    async def rate_limit(
        self, tenant: str, rate: float, burst: float, cost: float = 1
    ) -> RateLimitResult:
        return await self._run(self._ops.rate_limit(tenant, rate, burst, cost))

    async def queue_depths(self, models: Sequence[str]) -> dict[str, int]:
        return await self._run(self._ops.queue_depths(models))

    async def idempotency(self, tenant: str, key: str) -> tuple[str, str] | None:
        return await self._run(self._ops.idempotency(tenant, key))

    async def live_models(self) -> set[str]:
        return await self._run(self._ops.live_models())

    async def expired_jobs(self, now: float | None = None, limit: int = 100) -> list[str]:
        return await self._run(self._ops.expired_jobs(now, limit))

    async def purge_jobs(self, job_ids: Sequence[str]) -> int:
        return await self._run(self._ops.purge_jobs(job_ids)) if job_ids else 0

    async def expired_inputs(self, now: float | None = None, limit: int = 100) -> list[str]:
        return await self._run(self._ops.expired_inputs(now, limit))

    async def forget_inputs(self, keys: Sequence[str], now: float | None = None) -> list[str]:
        return await self._run(self._ops.forget_inputs(keys, now)) if keys else []


def utc_now_iso() -> str:
    """An ISO-8601 UTC timestamp, the format of ``at`` in webhook deliveries."""
    return datetime.now(timezone.utc).isoformat()
