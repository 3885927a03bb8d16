"""Running the model: chunked prefill, decode loop and sampling over a session's KV cache."""
