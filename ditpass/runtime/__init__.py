"""What rewritten graphs call: collectives, attention kernels, step state."""
