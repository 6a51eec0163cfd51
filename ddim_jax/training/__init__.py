"""The training loop, its input feed and its reporting."""
