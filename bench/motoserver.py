"""moto's AWS stand-in served over HTTP/1.1 keep-alive, as AWS itself serves.

``python -m moto.server`` runs on werkzeug's development server, which closes the connection
after every response. AWS keeps connections open, and a delegate with shared clients reuses
them: measured against a server that refuses to, every call pays a TCP setup and teardown that
production never sees (about 1.5 ms of CPU per validation here). The same moto application under
waitress, a production WSGI server, keeps connections alive. Run: ``python -m bench.motoserver PORT``.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    from moto.moto_server.werkzeug_app import (  # noqa: PLC0415 - after the environment is set
        DomainDispatcherApplication,
        create_backend_app,
    )
    from waitress import serve  # noqa: PLC0415

    app = DomainDispatcherApplication(create_backend_app)
    serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=32, connection_limit=1000, _quiet=True)


if __name__ == "__main__":
    main()
