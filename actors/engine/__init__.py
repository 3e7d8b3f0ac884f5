"""The CPU engine core (no torch, no Ray): the engine loop and its thread, scheduler, block manager, sequences."""
