"""`membound plan` and `membound doctor`: what fits, how fast it can be, why it is slow."""
