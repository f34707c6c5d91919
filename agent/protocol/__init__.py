"""Protocol v1 between delegate and control plane: wire models, errors, auth and clients.

Both sides import this package and nothing else of each other.
"""

from agent.protocol.models import PROTOCOL_VERSION, TASK_TYPE_AWS_VALIDATE

__all__ = ["PROTOCOL_VERSION", "TASK_TYPE_AWS_VALIDATE"]
