"""The reference control plane: registry, durable task queue with leases, connectors, tests.

Exported lazily (``agent._lazy``), so importing one module of the package (``core`` in a test, the
platform validator) does not load the aiohttp application and its routes.
"""

from typing import TYPE_CHECKING

__all__ = ["ControlPlane", "ControlPlaneConfig", "ControlPlaneService", "ControlPlaneSettings"]

if TYPE_CHECKING:  # the checker sees the real names, and no __getattr__ that would let any name through
    from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
    from agent.controlplane.core import ControlPlane, ControlPlaneSettings
else:
    from agent._lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        globals(),
        {
            "ControlPlane": "agent.controlplane.core",
            "ControlPlaneConfig": "agent.controlplane.app",
            "ControlPlaneService": "agent.controlplane.app",
            "ControlPlaneSettings": "agent.controlplane.core",
        },
    )
