"""Command-line front ends (thin: the work is in the library); scripts/ calls these."""
