"""Serving many clients: an OpenAI-compatible API over the chat engine, and replicas on Ray Serve.

``backend.py`` is the seam: the ``ChatBackend`` protocol that the ingress (``api.py``) talks to, the request it takes
(``ChatRequest``) and the simple backend that runs one ``generate.chat.Chat`` per request. Nothing here imports
gradio; FastAPI and uvicorn come with the ``app`` extra, Ray with the ``serve`` extra (imported only by
``ray_app.py``).
"""
