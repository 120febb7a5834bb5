"""Simulated hardware that speaks the real protocols, around one shared simulated world."""
