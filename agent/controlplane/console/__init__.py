"""The control plane's web console: connectors, their health and tests, delegates, in a browser.

Served by the control plane itself (``/console/``), server-rendered, readable without JavaScript;
htmx (vendored in ``static/``) only updates a row in place. :class:`Console` mounts it on the app.
"""

from agent.controlplane.console.web import Console

__all__ = ["Console"]
