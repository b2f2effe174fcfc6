"""Mix'n'Match: per-layer granularities (and bit widths) searched for the best submodel under a budget; candidates.py
holds the budget and the pruned space, search.py evaluates it, frontier.py tables and plots the result."""
