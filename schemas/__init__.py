"""Contracts shared by every gpumeter service (specified in docs/contracts.md)."""
