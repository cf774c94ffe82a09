"""The project's OpenAI-compatible mock engine, run as its own process."""
