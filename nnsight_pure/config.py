"""``nnsight_pure.CONFIG``: nnsight 0.4's configuration object, with its keys.

nnsight 0.4 scripts set ``nnsight.CONFIG.APP.DEBUG = False`` or
``CONFIG.set_default_api_key(...)``; those lines must keep working. Each key
is honoured where it means something here and harmless where it does not:

============================  =========================================================
``APP.GLOBAL_TRACING``        True: torch factory functions, ``torch.nn.Parameter``,
                              optimizers, ``DataLoader`` and ``zero_grad`` called inside
                              an open block are recorded (`recorded_calls`). False: they
                              run at once, as plain Python.
``APP.FRAME_INJECTION``       True: after the block, a saved proxy reports its value's
                              class, so ``isinstance(saved, torch.Tensor)`` holds and code
                              that checks it (tokenizers, numpy, plotting) takes it.
                              False: saved proxies stay plain proxies (use ``.value``).
``APP.CONTROL_FLOW_HANDLING`` read by native ``if``/``for`` on proxies (the errors say so).
``APP.DEBUG``                 harmless: source lines are always recorded (errors name them).
``APP.LOGGING``,              harmless: nothing here logs (``nnsight_pure.logger`` and
``APP.REMOTE_LOGGING``        ``remote_logger`` exist for scripts that configure them).
``API.*``                     harmless: kept for scripts that set them; nothing is remote.
============================  =========================================================

The object is plain process configuration, read when a block records; it
holds no tracing state.
"""

from __future__ import annotations

import logging

import attrs

logger = logging.getLogger("nnsight")
remote_logger = logging.getLogger("nnsight_remote")


@attrs.define
class ApiConfig:
    """nnsight 0.4's NDIF settings (kept so that scripts setting them still run)."""

    HOST: str = "ndif.dev"
    SSL: bool = True
    FORMAT: str = "json"
    ZLIB: bool = True
    APIKEY: str | None = None
    JOB_ID: str | None = None


@attrs.define
class AppConfig:
    """nnsight 0.4's application switches (see the module docstring for what each does here)."""

    DEBUG: bool = True
    FRAME_INJECTION: bool = True
    GLOBAL_TRACING: bool = True
    CONTROL_FLOW_HANDLING: bool = True
    LOGGING: bool = False
    REMOTE_LOGGING: bool = True


@attrs.define
class Config:
    """``nnsight_pure.CONFIG``: ``CONFIG.APP.*`` and ``CONFIG.API.*`` as in nnsight 0.4."""

    API: ApiConfig = attrs.Factory(ApiConfig)
    APP: AppConfig = attrs.Factory(AppConfig)

    def set_default_api_key(self, apikey: str) -> None:
        """Set ``API.APIKEY`` (nnsight 0.4 also wrote it to its package's config file; this does not)."""
        self.API.APIKEY = apikey

    def set_default_app_debug(self, debug: bool) -> None:
        """Set ``APP.DEBUG``."""
        self.APP.DEBUG = debug

    def save(self) -> None:
        """Accepted for nnsight 0.4 scripts; settings here live for the process only."""


CONFIG = Config()
