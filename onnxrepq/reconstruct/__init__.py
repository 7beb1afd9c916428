"""Block partitioning, the torch block executor and the learned quantizers."""
