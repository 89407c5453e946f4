"""A faithful local model of the Proto AICX developer API, for the demo, the tests and benchmarks.

    config = SandboxConfig.from_env(None, None, rate_limit=20, fail_rate=0.01)
    with running_sandbox(config) as base_url:   # http://127.0.0.1:PORT/api/platform
        ...

Beside the API it answers /_sandbox/customers/{subcompany_id}, /_sandbox/stats,
/_sandbox/tickets/{subcompany_id}, /_sandbox/custom-fields/{subcompany_id},
GET/POST /_sandbox/faults and POST /_sandbox/reset. What it assumes where the vendor's
page is silent is listed in docs/proto-api.md.
"""

from .app import create_app
from .config import API_BASE_PATH, DEFAULT_SUBCOMPANY_ID, DEFAULT_TOKEN, SandboxConfig
from .server import running_sandbox, sandbox_process, serve

__all__ = [
    "API_BASE_PATH",
    "DEFAULT_SUBCOMPANY_ID",
    "DEFAULT_TOKEN",
    "SandboxConfig",
    "create_app",
    "running_sandbox",
    "sandbox_process",
    "serve",
]
