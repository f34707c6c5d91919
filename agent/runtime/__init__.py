"""The delegate daemon: settings, connection, poller, executor, outbox, reporter, and the Agent.

Exported lazily (``agent._lazy``), so ``agent.runtime.settings`` alone (``check-config``) does not
load the Agent, aiohttp and the metrics.
"""

from typing import TYPE_CHECKING

__all__ = ["Agent", "AgentSettings", "ConfigError", "load_settings"]

if TYPE_CHECKING:  # the checker sees the real names, and no __getattr__ that would let any name through
    from agent.runtime.agent import Agent
    from agent.runtime.settings import AgentSettings, ConfigError, load_settings
else:
    from agent._lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        globals(),
        {
            "Agent": "agent.runtime.agent",
            "AgentSettings": "agent.runtime.settings",
            "ConfigError": "agent.runtime.settings",
            "load_settings": "agent.runtime.settings",
        },
    )
