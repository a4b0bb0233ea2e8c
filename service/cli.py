"""`warm-serve`: parse the settings (flags and WARM_* variables), run uvicorn, drain on SIGTERM."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

from service.app import create_app
from service.backends.vllm import NOT_INSTALLED
from service.loader import LoadError, resolve_model
from service.settings import Settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT first marks the service not ready."""

    def __init__(self, config: uvicorn.Config, on_signal: list[Callable[[], None]]) -> None:
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Mark not ready, then let uvicorn stop accepting and finish in-flight requests."""
        for callback in self.on_signal:
            callback()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once stopped (exit by signal, 143); a completed
        # drain is a clean stop, so the process exits 0.
        self._captured_signals.clear()


def parse(argv: list[str]) -> Settings:
    """Settings from flags and the environment; exits 2 with one line per problem."""
    try:
        return CliApp.run(Settings, cli_args=argv)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(p) for p in problem["loc"]) or "settings"
            print(f"warm-serve: {field}: {problem['msg']}", file=sys.stderr)
    except SettingsError as error:
        print(f"warm-serve: {error}", file=sys.stderr)
    raise SystemExit(2)


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; the exit status (1 if the model failed to load)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
        access_log=False,
    )
    state = app.state.warm
    server = DrainingServer(config, on_signal=[state.start_draining])
    failed: list[str] = []

    def fatal(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `warm-serve`."""
    settings = parse(sys.argv[1:] if argv is None else argv)
    try:
        resolve_model(settings.model)
    except LoadError as error:
        print(f"warm-serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        print(f"warm-serve: {NOT_INSTALLED}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(serve(settings))


if __name__ == "__main__":
    main()
