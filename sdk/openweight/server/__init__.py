"""`openweight serve`: local engines behind an OpenAI-compatible HTTP API.

``app.py`` builds the FastAPI app over a ``ModelPool`` of engines (``pool.py``; never a
Client, so a server never forwards to a keep-alive or remote server); ``command.py`` is
the command. FastAPI and uvicorn are imported only when a server is built, so ``import
openweight`` and the rest of the CLI stay cheap.
"""

from .app import create_app
from .command import add_serve_parser, cmd_serve
from .errors import ApiError, api_error
from .limits import ServerLimits
from .pool import ModelPool

__all__ = ["ApiError", "ModelPool", "ServerLimits", "add_serve_parser", "api_error", "cmd_serve",
           "create_app"]
