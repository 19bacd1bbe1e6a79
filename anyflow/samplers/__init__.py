"""Fast flow-map samplers: bidirectional and FAR (chunk-wise with a KV cache), any number of steps."""
