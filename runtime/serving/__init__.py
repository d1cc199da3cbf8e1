"""Serving a loaded engine over HTTP: an OpenAI-compatible API (`app.create_app`), its
request and response schema (`protocol`) and stop strings on streamed text (`stops`).
Needs FastAPI and uvicorn (``pip install 'leapc[serve]'``), not torch."""
