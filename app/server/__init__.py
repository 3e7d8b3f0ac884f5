"""The OpenAI-compatible HTTP server.

api.py builds the FastAPI app from an EngineClient (engine_client.py); completions.py and chat.py
serve the two generation routes on top of serving.py's shared checks; protocol.py holds the wire
schemas, errors.py the error shape, streaming.py the SSE framing, metrics.py /metrics.
serve_app.py is the Ray Serve deployment; launch.py runs either backend until Ctrl-C.

Importing this package stays light: nothing here starts Ray or loads a model.
"""

from strata.app.server.settings import ServerSettings

__all__ = ["ServerSettings"]
