"""The HTTP server (``loopserve serve``): an asyncio frontend (FastAPI + uvicorn) that speaks the
OpenAI and SGLang HTTP APIs, tokenizes and detokenizes, and a scheduler process built by the one
build path that runs the loop plugin, KV cache and worker. The two talk over ZMQ with
msgspec-encoded messages (``protocol``)."""
