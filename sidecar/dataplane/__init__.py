"""The data plane: OpenAI requests relayed to the engine and measured (admission, the exchange, the relay,
the recording of a finished request)."""
