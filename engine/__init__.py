"""The runtime: config, checkpoint, model, conditioning, decoding, codec."""
