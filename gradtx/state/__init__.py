"""The memory engine: optimizer-state accounting, storage dtype policy, quantized and packed layouts."""
