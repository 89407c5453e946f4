"""The Proto AICX developer API: client, rate limiters, retry policy and wire shapes."""

from ._breaker import Breaker, LocalBreaker, RedisBreaker
from ._client import ProtoClient
from ._limiter import Limiter, LocalLimiter, RedisLimiter
from ._retry import RetryPolicy
from ._wire import FIELD_TYPES, PROFILE_FIELDS, CustomField

__all__ = [
    "FIELD_TYPES",
    "PROFILE_FIELDS",
    "Breaker",
    "CustomField",
    "Limiter",
    "LocalBreaker",
    "LocalLimiter",
    "ProtoClient",
    "RedisBreaker",
    "RedisLimiter",
    "RetryPolicy",
]
