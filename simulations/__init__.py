"""simulations layer of fedfusion (see DESIGN.md §2)."""
