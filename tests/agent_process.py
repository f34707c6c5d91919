"""Run a real delegate process with the test handlers (for signal, kill -9 and PID 1 tests).

Settings come from the environment exactly as for `delegate-agent run`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.observability.logging import Redactor, configure_logging
from agent.runtime.agent import Agent, serve
from agent.runtime.settings import ConfigError, load_settings
from tests.handlers import all_handlers


def main() -> int:
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    redactor = Redactor()
    configure_logging(fmt="json", level="info", redactor=redactor)
    agent = Agent(settings, handlers=list(all_handlers().values()), redactor=redactor)
    return asyncio.run(serve(agent))


if __name__ == "__main__":
    sys.exit(main())
