"""Node plumbing: this node's address and facts, the mp rendezvous across nodes, link checks, the doctor's checks."""
