"""Graph stages: insert branches, fold them, make slots and stacked (mixed) branches, check them."""
