"""FT: plain cross-entropy fine-tuning of encoder and current head; it adds no plugin."""
