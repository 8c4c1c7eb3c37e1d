"""The OpenAI-compatible HTTP API of the router (aiohttp on the router's event loop). Never imports torch."""
