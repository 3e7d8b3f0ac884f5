"""The OpenAI-compatible HTTP server: FastAPI app (api.py), its schemas (protocol.py), the engine
client it is given (engine_client.py), and the Ray Serve deployment (serve_app.py).

Importing this package stays light: nothing here starts Ray or loads a model.
"""

from app.server.settings import ServerSettings

__all__ = ["ServerSettings"]
