"""Networking: authenticated framed connections between marsd instances."""
