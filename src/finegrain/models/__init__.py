"""Model plumbing: forward passes in the shared batch layout, builders and loading."""
