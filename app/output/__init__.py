"""The output processor: engine deltas -> text (detokenize, stop strings) -> RequestOutput."""
