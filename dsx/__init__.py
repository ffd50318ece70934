"""dsx (temporary minimal init while the API is assembled)."""
