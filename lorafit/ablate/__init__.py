"""`lorafit ablate`: train a grid of settings and methods on the same data, seed and step budget, and
tabulate and plot what each point costs and reaches (lorafit.ablate.run)."""
