"""delegate-agent: a lightweight delegate that validates AWS connectors from inside your cluster.

The public surface is small on purpose; everything else is internal and may move.

The names are exported lazily (see ``agent._lazy``): Python runs this file before any ``agent.*``
module, so eager imports here would make ``delegate-agent --help`` load the whole daemon.
"""

from typing import TYPE_CHECKING

from agent._version import __version__

__all__ = ["Agent", "AgentSettings", "__version__", "load_settings", "main"]

if TYPE_CHECKING:  # the checker sees the real names, and no __getattr__ that would let any name through
    from agent.cli import main
    from agent.runtime.agent import Agent
    from agent.runtime.settings import AgentSettings, load_settings
else:
    from agent._lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        globals(),
        {
            "Agent": "agent.runtime.agent",
            "AgentSettings": "agent.runtime.settings",
            "load_settings": "agent.runtime.settings",
            "main": "agent.cli",
        },
    )
