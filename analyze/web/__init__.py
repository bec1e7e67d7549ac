"""saelake's web UI (``lake serve``) and static dashboards (``lake export-dashboard``).

Standard library HTTP server + Jinja2 templates + server-side SVG charts + a little vanilla
JavaScript: no Node build, no CDN, nothing fetched at run time.

    from saelake.analyze.web import WebApp, start_in_thread
    server, _ = start_in_thread(WebApp("./lake"), port=0)   # http://127.0.0.1:<server.server_address[1]>/
"""

from saelake.analyze.selection import parse_features

from .export import export_dashboard
from .server import WebApp, make_server, start_in_thread

__all__ = ["WebApp", "export_dashboard", "make_server", "parse_features", "start_in_thread"]
