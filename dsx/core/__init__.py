"""The layer every dsx transform builds on: example inputs, the Transform base, verification, history."""
