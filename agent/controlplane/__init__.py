"""The reference control plane: registry, durable task queue with leases, connectors, tests."""

from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
from agent.controlplane.core import ControlPlane, ControlPlaneSettings

__all__ = ["ControlPlane", "ControlPlaneConfig", "ControlPlaneService", "ControlPlaneSettings"]
