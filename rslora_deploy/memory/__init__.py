"""Device memory of a package: estimated, measured, solved and drawn.

``estimate`` is the formula (stage ``check_budget`` writes it); ``measure`` checks it against a
real run on the device; ``solver`` answers "what would fit"; ``html`` draws it (docs/budget.md).
"""
