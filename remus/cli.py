"""Command-line interface (placeholder until filled in below)."""
def main() -> None:
    pass
