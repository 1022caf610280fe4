"""Every Redis key the system uses, in one place so the gateway, the workers and tests agree.

All keys live under one prefix (``masactrl`` unless configured)::

    job:<id>                  hash    the job record (see records.py)
    job:<id>:events           stream  status / progress / preview / terminal events; ids are SSE ids
    job:<id>:lease            string  worker id holding the job, with a TTL renewed by heartbeat
    job:<id>:webhook:outbox   list    webhook events waiting for their first attempt, in order
    job:<id>:webhook:sent     set     webhook message ids whose first attempt was made
    job:<id>:webhook:lock     string  token of the one drainer of the job's outbox
    tenant:<t>:jobs           zset    the tenant's job ids, score 0, so BYLEX order = UUIDv7 order
    queue:<model>             zset    queued job ids by enqueue time: depth, FIFO position
    queue:<model>:tenant:<t>  zset    tenant t's queued ids by priority, then submission order
    queue:<model>:active      zset    tenants with queued jobs by pass (fair share, claim.lua)
    queue:<model>:fair        hash    each tenant's pass and stride, and the latest start's pass
    queue:<model>:deadlines   zset    queued job ids with a deadline, by deadline
    running                   zset    running job ids by start time (janitor input)
    taken                     zset    queued job ids by when a worker took their message (janitor)
    expiry                    zset    job ids by the time their record and results are removed
    inputs                    zset    content-addressed input keys by the time they may be removed
    idem:<t>:<sha256(key)>    string  "<body hash> <job id>", TTL = job retention
    ratelimit:<t>             hash    token bucket
    workers:<model>           zset    live worker ids by heartbeat deadline
    model-shape:<model>       string  the shape (JSON) its live workers measured, TTL = heartbeat
    worker-models             set     models that ever had a worker
    webhooks:scheduled        zset    webhook retries (JSON) by the time they are due
    inversion-cache           zset    cached inversion storage keys by last use

The Celery broker lists (``masactrl.<model>``, ``masactrl.webhooks``) are kombu's, named after
their queues, and are not under the prefix.

Some scripts build key names from record fields (the queue of a job's model, the jobs listed from
an index). That is fine on one Redis server or a replicated pair, which is what this service runs
on; it would need hash tags to run on Redis Cluster.
"""

from __future__ import annotations

import hashlib

__all__ = ["Keys"]


class Keys:
    """Redis key names under ``prefix``."""

    def __init__(self, prefix: str = "masactrl") -> None:
        self.prefix = prefix
        self.job_prefix = f"{prefix}:job:"
        self.queue_prefix = f"{prefix}:queue:"
        self.workers_prefix = f"{prefix}:workers:"
        self.running = f"{prefix}:running"
        self.taken = f"{prefix}:taken"
        self.expiry = f"{prefix}:expiry"
        self.inputs = f"{prefix}:inputs"
        self.worker_models = f"{prefix}:worker-models"
        self.webhook_schedule = f"{prefix}:webhooks:scheduled"
        self.inversion_cache = f"{prefix}:inversion-cache"

    def job(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:events"

    def lease(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:lease"

    def webhook_outbox(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:webhook:outbox"

    def webhook_sent(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:webhook:sent"

    def webhook_lock(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:webhook:lock"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def queue(self, model: str) -> str:
        return f"{self.queue_prefix}{model}"

    def idempotency(self, tenant: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}:idem:{tenant}:{digest}"

    def rate_limit(self, tenant: str) -> str:
        return f"{self.prefix}:ratelimit:{tenant}"

    def tenant_queue(self, model: str, tenant: str) -> str:
        return f"{self.queue_prefix}{model}:tenant:{tenant}"

    def active_tenants(self, model: str) -> str:
        return f"{self.queue_prefix}{model}:active"

    def fair_share(self, model: str) -> str:
        return f"{self.queue_prefix}{model}:fair"

    def deadlines(self, model: str) -> str:
        return f"{self.queue_prefix}{model}:deadlines"

    def workers(self, model: str) -> str:
        return f"{self.workers_prefix}{model}"

    def model_shape(self, model: str) -> str:
        return f"{self.prefix}:model-shape:{model}"
