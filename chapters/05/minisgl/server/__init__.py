"""The HTTP server: an OpenAI-compatible API in front of the scheduler (introduced in chapter 02)."""
