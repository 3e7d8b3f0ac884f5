"""The CPU engine core (plain Python, no torch, no Ray): engine loop, scheduler, block manager, sequences."""
