"""The OpenAI-compatible HTTP server.

api.py builds the FastAPI app from an `Engine` (strata/engine_protocol.py), the settings and the
tokenizer; engine_client.py is what the server adds on top of the engine (backpressure estimate,
abort on close, health with a timeout), tokenizer.py the ingress's tokenizer work. completions.py
and chat.py serve the two generation routes on top of serving.py's shared checks and its engine
-> output processor plumbing; protocol.py holds the wire schemas, errors.py the error shape,
streaming.py the SSE framing, metrics.py /metrics. serve_app.py is the Ray Serve deployment (its
engine factory injected); launch.py runs either backend until Ctrl-C.

Nothing here imports strata.actors or strata.placement: engines come from strata.app.engines,
placement facts from strata.app.ray_serve_support. Importing this package stays light: nothing
here starts Ray or loads a model.
"""

from strata.app.server.settings import ServerSettings

__all__ = ["ServerSettings"]
