"""The imperative shell: `with` contexts that each hold one mutable cell, the current graph."""
