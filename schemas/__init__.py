"""Contracts shared by every gpumeter service (see ../shared/CONTRACTS.md)."""
