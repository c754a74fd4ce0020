"""kvxfer: move paged KV-cache blocks between LLM inference engines."""
