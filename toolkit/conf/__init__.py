"""The shipped Hydra configs (a package so that Hydra finds them installed or in a checkout)."""
