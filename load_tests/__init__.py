"""Load and benchmark tools; run as modules (`python -m load_tests.<name>`), never collected
by pytest."""
