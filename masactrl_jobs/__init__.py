"""Torch-free code shared by the gateway and the workers.

Modules: ``settings`` (shared settings base), ``catalog`` (model catalog), ``storage`` (S3 and file
backends), ``netguard`` (SSRF guard for outbound HTTP), ``images`` (image intake), plus the job
schema, store and queue. Nothing is imported here so that ``import masactrl_jobs`` stays cheap and
never drags in boto3, Pillow or an ML library.
"""
