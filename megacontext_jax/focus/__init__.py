"""The working context and its focus (DESIGN sections 4, 5 and 8): the WC type, its rules (the
invariants, the recency pyramid, legal edits), the allocator, and entry positions. Pure JAX and
NumPy: no networks here."""
