"""The data stage: raw files → clean, deduplicated, PII-scrubbed, tokenized shards + manifest."""
