"""The HTTP server: an OpenAI-compatible API in front of the scheduler (chapter 02)."""
