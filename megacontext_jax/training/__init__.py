"""Training (DESIGN section 8): the losses, the training contexts (variants), the jitted step and
the loop, checkpoints and restore, sharding, metrics, the start-up block and stop requests."""
