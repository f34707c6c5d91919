"""The delegate daemon: settings, connection, poller, executor, outbox, reporter, and the Agent."""

from agent.runtime.agent import Agent
from agent.runtime.settings import AgentSettings, ConfigError, load_settings

__all__ = ["Agent", "AgentSettings", "ConfigError", "load_settings"]
