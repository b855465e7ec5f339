"""The OpenAI-compatible HTTP server (`lmforge serve`)."""
