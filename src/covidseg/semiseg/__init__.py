"""semiseg."""
