"""delegate-agent: a lightweight delegate that validates AWS connectors from inside your cluster.

The public surface is small on purpose; everything else is internal and may move.
"""

from agent._version import __version__
from agent.cli import main
from agent.runtime import Agent, AgentSettings, load_settings

__all__ = ["Agent", "AgentSettings", "__version__", "load_settings", "main"]
